"""The demo's story on the real embedded default (the tiny base as users get it): v1 accepted,
v2 better than v1 and accepted, a poisoned batch rejected by the gate alone with v2 still current
and held, a second one held by screening, rollback to v1, v4 built on v1 from clean rows only. The
slowest test: it trains four versions."""

from __future__ import annotations

import pytest
from rich.console import Console

pytestmark = pytest.mark.integration


def test_demo_story(prefect_api, tmp_path, monkeypatch):
    from cli.demo import DAY3_POISON, DAY3B_POISON, day_ids, run_demo
    from incremental.feedback import FeedbackStore
    from incremental.registry import Registry

    for key in ("INCREMENTAL_DB_PATH", "INCREMENTAL_MODELS_ROOT", "INCREMENTAL_MODEL", "INCREMENTAL_BASE_MODEL"):
        monkeypatch.setenv(key, "")  # run_demo sets these; monkeypatch restores them afterwards
    console = Console(record=True, width=160)
    v1, v2, v3, v3b, v4 = run_demo(tmp_path / "demo", console)

    assert (v1.status, v2.status, v3.status, v3b.status) == ("accepted", "accepted", "rejected", "skipped")
    assert v2.parent == v1.version and v2.candidate_scores["target_nll"] < v2.parent_scores["target_nll"]
    assert v3.verdict in ("reject", "inconclusive") and v3.n_held > 0 and v3b.n_screened > 0
    assert v4.parent == v1.version
    registry = Registry(tmp_path / "demo" / "finetuned_models", "tiny")
    assert registry.get(v3.version).manifest.status == "rejected"
    # Both poisoned batches are held (by the gate, then by screening), and v4 trained on none of them.
    poisoned = set(day_ids(DAY3_POISON, 0)) | set(day_ids(DAY3B_POISON, 0))
    store = FeedbackStore(tmp_path / "demo" / "feedback.duckdb")
    assert poisoned <= {mark.feedback_id for mark in store.marks("tiny") if mark.action == "hold"}
    v4_data = registry.get(v4.version).manifest.data
    assert not poisoned & (set(v4_data.new_ids) | set(v4_data.replay_ids))
    assert [entry["action"] for entry in registry.history()][:3] == ["promote", "promote", "rollback"]
    text = console.export_text()
    assert "Versions of tiny" in text and v3.version in text and "Story checked" in text
