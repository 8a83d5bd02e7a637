"""The demo's story on the real embedded default (the tiny base as users get it): v1 accepted,
v2 better than v1 and accepted, a poisoned batch rejected by the gate with v2 still current and
held, rollback to v1, v4 built on v1 from clean rows only. The slowest test: it trains four versions."""

from __future__ import annotations

import pytest
from rich.console import Console

pytestmark = pytest.mark.integration


def test_demo_story(prefect_api, tmp_path, monkeypatch):
    from cli.demo import run_demo
    from incremental.feedback import FeedbackStore
    from incremental.registry import Registry

    for key in ("INCREMENTAL_DB_PATH", "INCREMENTAL_MODELS_ROOT", "INCREMENTAL_MODEL", "INCREMENTAL_BASE_MODEL"):
        monkeypatch.setenv(key, "")  # run_demo sets these; monkeypatch restores them afterwards
    console = Console(record=True, width=160)
    v1, v2, v3, v4 = run_demo(tmp_path / "demo", console)

    assert (v1.status, v2.status, v3.status) == ("accepted", "accepted", "rejected")
    assert v2.parent == v1.version and v2.candidate_scores["target_nll"] < v2.parent_scores["target_nll"]
    assert v4.parent == v1.version
    registry = Registry(tmp_path / "demo" / "finetuned_models", "tiny")
    assert registry.get(v3.version).manifest.status == "rejected"
    # The poisoned batch is held (by screening or by the gate), and v4 trained on none of it.
    poisoned = {f"demo-303-{i:03d}" for i in range(80)}
    held = set(FeedbackStore(tmp_path / "demo" / "feedback.duckdb").held_by("tiny", v3.version))
    v4_data = registry.get(v4.version).manifest.data
    assert poisoned - held <= set(v4_data.eval_ids) | set(v4_data.rejected_ids), "poisoned train rows not held"
    assert not poisoned & (set(v4_data.new_ids) | set(v4_data.replay_ids))
    assert [entry["action"] for entry in registry.history()][:3] == ["promote", "promote", "rollback"]
    text = console.export_text()
    assert "Versions of tiny" in text and v3.version in text
