"""`incremental report`: the history page and chart, on a realistic history made by the registry and the
store (v1 accepted, v2 accepted, v3 rejected with its batch held, a rollback to v1, v4 accepted with
rows screened out, rows excluded by a person). The page's numbers must be the manifests' and the
store's; the chart must be a real PNG of its fixed size; the page must need nothing but itself.
The flow test checks a run attaches the report; tests/server/test_report_browser.py opens the page in
Debian's Chromium (there, not here: Playwright's sync API keeps an event loop in the main thread for the
rest of the session, under which the in-process Prefect calls of later integration tests go async).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import feedback_row, ids_in
from typer.testing import CliRunner

from incremental.config import RunConfig
from incremental.feedback import FeedbackStore
from incremental.gate import GateEvidence, PairedScores, decide
from incremental.prompting import LATEST_LAYOUT
from incremental.history_report import (
    CHART_SIZE_PX,
    chart_figure,
    default_report_dir,
    gather_history,
    history_markdown,
    lineage_tree_lines,
    quality_series,
    render_html,
    write_report,
)
from incremental.manifest import BaseModelRef, TrainingRecord, draft_manifest
from incremental.registry import Registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=timezone.utc)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class History:
    registry: Registry
    store: FeedbackStore
    v1: str
    v2: str
    v3: str
    v4: str


@functools.cache
def registry_tests():
    """tests/unit/test_registry.py (its `write_adapter`), loaded by path: this module is loaded by path too,
    from tests/server, where the test folders are not on sys.path."""
    spec = importlib.util.spec_from_file_location("registry_helpers", ROOT / "tests" / "unit" / "test_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evidence(seed: int, parent_first: bool, regression: int, new: int, shift: float) -> GateEvidence:
    """Per-example scores as evaluation produces them: the candidate's target NLL moved by `shift` nats
    against the parent's, prompt gain nearly unchanged; on the judged slice and the batch's own rows."""
    rng = np.random.default_rng(seed)
    scores = {}
    judged = "all" if parent_first else "regression"
    for slice_, n in ((judged, regression), ("new", new)):
        if n == 0:
            continue
        ids = tuple(f"{slice_}-{i}" for i in range(n))
        parent_nll = rng.normal(1.2, 0.05, n)
        parent_gain = rng.normal(0.30, 0.02, n)
        scores[("target_nll", slice_)] = PairedScores(ids, parent_nll + shift + rng.normal(0, 0.01, n), parent_nll, np.ones(n))
        scores[("prompt_gain", slice_)] = PairedScores(ids, parent_gain + rng.normal(0.005, 0.005, n), parent_gain, np.ones(n))
        # Greedy generations' validity per artifact type, as the gate sees them.
        types = tuple(("erd", "api", "prototype")[i % 3] for i in range(n))
        valid = rng.random((2, n)) < 0.8
        scores[("artifact_validity", slice_)] = PairedScores(ids, valid[0].astype(float), valid[1].astype(float), np.ones(n), types)
    return GateEvidence(snapshot_hash=f"{seed:064x}", first_version=parent_first, scores=scores)


def _make_version(registry, store, parent, *, at, new, replay, eval_ids, regression, shift, seed, screened=(), held=()):
    """A version as the flow finalizes it: reserved, adapter written, gate decided on real checks, the
    manifest drafted by `draft_manifest`, consumption recorded, then finalized by the registry."""
    config = RunConfig()
    decision = decide(_evidence(seed, parent is None, regression, len(eval_ids) - regression, shift), config.gate)
    judged = "all" if parent is None else "regression"
    scores = {
        role: {c["metric"]: c[role] for c in (check.as_record() for check in decision.checks) if c["slice"] == judged}
        for role in ("candidate", "parent")
    }
    reservation = registry.reserve(parent, now=at)
    registry_tests().write_adapter(reservation.staging_dir, seed=float(seed))
    snapshot = SimpleNamespace(
        dataset_hash=f"{seed:064x}", eval_snapshot_hash=f"{seed + 1:064x}", new_ids=tuple(new), replay_ids=tuple(replay),
        eval_ids=tuple(eval_ids), rejected_ids=(), arrived_with_batch_ids=tuple(eval_ids[regression:]),
    )  # fmt: skip
    training = TrainingRecord(
        mode="base" if parent is None else "incremental", device="cpu", quantization="none", steps=3, epochs=1.0,
        train_loss=1.1, trainable_parameters=4096, target_tokens=900, wall_seconds=4.2,
    )  # fmt: skip
    manifest = draft_manifest(
        name=reservation.name, model=MODEL, parent=parent, created_at=reservation.created_at,
        base=BaseModelRef(id="embedded", revision="0" * 40), config=config, snapshot=snapshot, training=training,
        scores=scores, decision=decision, prompt_layout=LATEST_LAYOUT, screened_ids=tuple(screened), held_ids=tuple(held),
    )  # fmt: skip
    store.record_consumption(MODEL, reservation.name, new_ids=new, replay_ids=replay)
    if screened:
        store.mark(MODEL, screened, "hold", reason="target no more likely under its own notes", actor="screening", version=reservation.name)
    if held:
        store.mark(MODEL, held, "hold", reason="the gate rejected this batch", actor="gate", version=reservation.name)
    result = registry.finalize(reservation, manifest)
    assert result.status == ("accepted" if decision.accepted else "rejected"), decision.reasons
    return result.name


def make_history(models_root: Path, db_path: Path) -> History:
    store = FeedbackStore(db_path)
    store.init()
    registry = Registry(models_root, MODEL)
    batches = {
        n: (ids_in("train", size, prefix=f"b{n}"), ids_in("eval", evals, prefix=f"e{n}"))
        for n, size, evals in ((1, 20, 10), (2, 12, 4), (3, 8, 4), (4, 6, 3))
    }
    rows = [
        feedback_row(id=row_id, prompt=f"notes {row_id}", output=f"erDiagram E{row_id.replace('-', '')}")
        for train, evals in batches.values() for row_id in (*train, *evals)
    ]  # fmt: skip
    store.add_many(rows)
    (b1, e1), (b2, e2), (b3, e3), (b4, e4) = batches.values()

    v1 = _make_version(registry, store, None, at=T0, new=b1, replay=(), eval_ids=e1, regression=10, shift=-0.08, seed=1)
    v2 = _make_version(registry, store, v1, at=T0 + timedelta(days=1), new=b2, replay=b1[:6], eval_ids=(*e1, *e2),
                       regression=10, shift=-0.03, seed=2)  # fmt: skip
    # A poisoned batch: target NLL on the trusted rows rises far beyond the margin; the batch is held.
    v3 = _make_version(registry, store, v2, at=T0 + timedelta(days=2), new=b3, replay=b1[:5], eval_ids=(*e1, *e2, *e3),
                       regression=14, shift=0.2, seed=3, held=(*b3, *e3))  # fmt: skip
    registry.rollback(v1, reason="v2 answers worse in production")
    store.sync_learned(MODEL, registry.lineage())
    # On v1 again: v2's rows are new again; screening holds two of the new batch before training.
    v4 = _make_version(registry, store, v1, at=T0 + timedelta(days=3), new=(*b2, *b4[:4]), replay=b1[:5],
                       eval_ids=(*e1, *e2, *e4), regression=10, shift=-0.02, seed=4, screened=b4[4:])  # fmt: skip
    store.sync_learned(MODEL, registry.lineage())
    store.mark(MODEL, b3[:2], "exclude", reason="outputs swapped between notes", actor="ana")
    return History(registry, store, v1, v2, v3, v4)


@pytest.fixture
def history(tmp_path) -> History:
    return make_history(tmp_path / "finetuned_models", tmp_path / "feedback.duckdb")


class Cells(HTMLParser):
    """The page's table cells by their `data-version` / `data-metric`+`data-slice` row and `data-field`,
    every `src`/`href` attribute, every tag name, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._row: dict | None = None
        self._field: str | None = None
        self.section: str | None = None
        self.block: str | None = None  # the version whose <details> the parser is in

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [value for key, value in attrs.items() if key in ("src", "href") and value is not None]
        if tag == "section":
            self.section = attrs.get("id")
        if tag == "details":
            self.block = attrs.get("data-version")
        if tag == "tr":
            self._row = {"section": self.section, "block": self.block, **{k[5:]: v for k, v in attrs.items() if k.startswith("data-")}, "cells": {}}
            self.rows.append(self._row)
        if tag == "td" and self._row is not None and "data-field" in attrs:
            self._field = attrs["data-field"]
            self._row["cells"][self._field] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._field = None
        if tag == "details":
            self.block = None

    def handle_data(self, data):
        if self._field is not None:
            self._row["cells"][self._field] += data


def parse(page: str) -> Cells:
    cells = Cells()
    cells.feed(page)
    return cells


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def signed(value) -> str:
    return "—" if value is None else f"{value:+.4f}"


def test_the_page_shows_the_manifests_and_the_stores_numbers(history: History):
    registry, store = history.registry, history.store
    report = gather_history(registry, store)
    page = render_html(report)
    cells = parse(page)
    versions = {row["version"]: row["cells"] for row in cells.rows if row["section"] == "versions" and "version" in row}
    assert list(versions) == [history.v4, history.v3, history.v2, history.v1]  # newest first

    held_marks = {v: set(store.held_by(MODEL, v)) for v in (history.v1, history.v2, history.v3, history.v4)}
    excluded = {mark.feedback_id for mark in store.marks(MODEL) if mark.action == "exclude"}
    for name, shown in versions.items():
        manifest = registry.get(name).manifest
        data, gate = manifest.data, manifest.gate
        parent = manifest.scores["parent"]
        candidate = manifest.scores["candidate"]
        assert shown == {
            "status": manifest.status, "verdict": gate.verdict,
            "target_nll": fmt(candidate["target_nll"]), "nll_delta": signed(candidate["target_nll"] - parent["target_nll"]),
            "prompt_gain": fmt(candidate["prompt_gain"]), "gain_delta": signed(candidate["prompt_gain"] - parent["prompt_gain"]),
            "new": str(len(data.new_ids)), "replay": str(len(data.replay_ids)), "eval": str(len(data.eval_ids)),
            "rejected": str(len(data.rejected_ids)), "arrived_with_batch": str(len(data.arrived_with_batch_ids)),
            "screened": str(len(data.screened_ids)), "held_by_gate": str(len(gate.held_ids)),
            "held_now": str(len(held_marks[name] - excluded)),
            # Hand-made manifests record no generating versions; test_user_loop checks a real run's.
            "by_generating_version": "—",
        }, name  # fmt: skip

        # The gate's verdict table: every check, with its interval, as the manifest recorded it.
        checks = [row for row in cells.rows if row["block"] == name and "metric" in row]
        assert len(checks) == len(gate.checks), name
        for row, record in zip(checks, gate.checks):
            assert (row["metric"], row["slice"]) == (record["metric"], record["slice"])
            assert row["cells"]["n"] == str(record["n"])
            assert row["cells"]["candidate"] == fmt(record["candidate"]) and row["cells"]["parent"] == fmt(record["parent"])
            assert row["cells"]["delta"] == signed(record["delta"])
            interval = "—" if record["low"] is None else f"[{record['low']:+.4f}, {record['high']:+.4f}]"
            assert row["cells"]["interval"] == interval
            assert row["cells"]["margin"] == fmt(record["margin"])
            assert row["cells"]["verdict"].startswith(record["outcome"])

    # The poisoned v3 failed on target NLL: its regression check's interval lies above the margin.
    v3_gate = registry.get(history.v3).manifest.gate
    failed = next(c for c in v3_gate.checks if c["metric"] == "target_nll" and c["slice"] == "regression")
    assert failed["outcome"] == "fail" and failed["low"] > failed["margin"]

    # Feedback: the counts are the store's, the held and excluded groups add up to them.
    accepted_at = registry.get(history.v4).manifest.finalized_at
    counts = store.counts(MODEL, registry.lineage(), trusted_before=accepted_at)
    feedback = next(row["cells"] for row in cells.rows if row["section"] == "feedback" and "total" in row["cells"])
    assert feedback == {k: str(v) for k, v in vars(counts).items()}
    # v3's batch (8 train + 4 eval rows) held, 2 of them excluded since; 2 rows screened out of v4's batch.
    assert sum(g.count for g in report.feedback.held) == counts.held == 12 - 2 + 2
    assert sum(g.count for g in report.feedback.excluded) == counts.excluded == 2
    groups = {(row["state"], int(row["cells"]["count"])) for row in cells.rows if row.get("state")}
    assert groups == {("held", 10), ("held", 2), ("excluded", 2)}


def test_the_tree_marks_accepted_rejected_current_and_the_rollback(history: History):
    report = gather_history(history.registry, history.store)
    lines = lineage_tree_lines(report)
    text = "\n".join(lines)
    assert lines[0].startswith("base model")
    line = {name: next(l for l in lines if name in l) for name in (history.v1, history.v2, history.v3, history.v4)}
    assert "✓ accepted" in line[history.v1] and "↩ rollback from v2" in line[history.v1]
    assert "off the current lineage" in line[history.v2] and "↪ rolled back to v1" in line[history.v2]
    assert "✗ rejected (reject)" in line[history.v3]
    assert "★ current" in line[history.v4] and "✓ accepted" in line[history.v4]
    # The shape, oldest first: the current lineage (base, v1, v4) in the first column; v2 opens a branch
    # off v1 and v3 continues it.
    starts = ["base model", history.v1, f"├─ {history.v2}", f"│  {history.v3}", history.v4]
    assert len(lines) == len(starts) and all(f"{l}  ".startswith(f"{start}  ") for l, start in zip(lines, starts)), text
    assert [m.action for m in report.moves] == ["promote", "promote", "rollback", "promote"]
    assert report.lineage == (history.v4, history.v1) and report.current == history.v4


def test_the_chart_is_a_png_of_its_size_with_the_manifests_rows(history: History, tmp_path):
    import matplotlib.image

    report = gather_history(history.registry, history.store)
    files = write_report(report, tmp_path / "out")
    raw = files.png.read_bytes()
    # A real PNG: signature, then the IHDR chunk with the width and height.
    assert raw[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", raw[8:16])
    width, height = struct.unpack(">II", raw[16:24])
    assert (length, kind, (width, height)) == (13, b"IHDR", CHART_SIZE_PX)
    pixels = matplotlib.image.imread(files.png)
    assert pixels.shape[:2] == (CHART_SIZE_PX[1], CHART_SIZE_PX[0])
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas

    figure = chart_figure(report)
    by_label = {axes.get_label(): axes for axes in figure.axes}
    assert {"lineage", "data", "gate:target_nll", "gate:prompt_gain"} <= set(by_label)
    bars = {container.get_label(): [round(bar.get_height()) for bar in container] for container in by_label["data"].containers}
    manifests = [history.registry.get(name).manifest for name in (history.v1, history.v2, history.v3, history.v4)]
    assert bars["new"] == [len(m.data.new_ids) for m in manifests]
    assert bars["replay"] == [len(m.data.replay_ids) for m in manifests]
    assert bars["eval"] == [len(m.data.eval_ids) for m in manifests]
    assert bars["screened"] == [len(m.data.screened_ids) for m in manifests]
    assert bars["held by gate"] == [len(m.gate.held_ids) for m in manifests]
    # What users receive: one line per artifact type (and all types), each point a version's value.
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in by_label["quality:artifact_validity"].lines}
    expected = quality_series(report, "artifact_validity")
    assert {"erd", "api", "prototype", "all types"} <= set(expected), expected
    assert drawn == expected


def test_the_page_is_self_contained(history: History, tmp_path):
    report = gather_history(history.registry, history.store)
    files = write_report(report, tmp_path / "out")
    page = files.html.read_text(encoding="utf-8")
    cells = parse(page)
    # Nothing to fetch: every src is a data URL (the chart), no links out, no scripts, no stylesheets.
    assert cells.links and all(link.startswith("data:") for link in cells.links), cells.links
    assert not cells.tags & {"script", "link", "iframe", "object", "embed"}
    assert "url(" not in page and "@import" not in page
    (chart,) = cells.links
    assert base64.b64decode(chart.removeprefix("data:image/png;base64,")) == files.png.read_bytes()


def test_text_a_person_typed_stays_text_in_the_page_and_the_artifact(history: History):
    hostile = '<script>alert(1)</script> ![pixel](https://tracker.example/p.png) <img src="https://x.example/i.png"> **bold** | cell'
    row_id = history.store.held_by(MODEL, history.v3)[-1]
    history.store.mark(MODEL, [row_id], "exclude", reason=hostile, actor="<b>mallory</b>")
    history.registry.rollback(history.v2, reason=hostile)
    report = gather_history(history.registry, history.store)
    files = write_report(report, history.registry.root.parent.parent / "reports")
    cells = parse(files.html.read_text(encoding="utf-8"))
    assert "script" not in cells.tags and len(cells.links) == 1 and cells.links[0].startswith("data:image/png;base64,")
    markdown = history_markdown(report, files, files.png.read_bytes())
    # Markdown and HTML act only unescaped: one image (the chart), no tag at all.
    assert len(re.findall(r"(?<!\\)!\[", markdown)) == 1 and not re.search(r"(?<!\\)<", markdown)
    assert "\\!\\[pixel\\]" in markdown and "\\*\\*bold\\*\\*" in markdown  # escaped, shown as typed


def test_base_mode_without_a_database(tmp_path):
    report = gather_history(Registry(tmp_path / "finetuned_models", MODEL), None)
    assert report.current is None and report.versions == () and report.feedback is None
    page = render_html(report)
    assert "Base Mode" in page and "No versions yet" in page and "No feedback database yet" in page
    assert lineage_tree_lines(report) == ["base model  ★ current"]


def test_cli_report_writes_the_files_where_it_says(history: History, tmp_path, monkeypatch):
    from cli.main import app

    monkeypatch.setenv("INCREMENTAL_DB_PATH", str(tmp_path / "feedback.duckdb"))
    monkeypatch.setenv("INCREMENTAL_MODELS_ROOT", str(tmp_path / "finetuned_models"))
    monkeypatch.setenv("INCREMENTAL_MODEL", MODEL)
    runner = CliRunner()
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    folder = default_report_dir(tmp_path / "feedback.duckdb", MODEL)
    assert folder == tmp_path / "reports" / MODEL
    assert str(folder / "history.html") in result.output.replace("\n", "")
    assert (folder / "history.html").is_file() and (folder / "history.png").is_file()

    chosen = tmp_path / "elsewhere"
    result = runner.invoke(app, ["report", "--out", str(chosen), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["html"] == str(chosen / "history.html") and document["png"] == str(chosen / "history.png")
    assert document["current"] == history.v4 and document["versions"] == 4
    assert document["report"]["versions"][2]["data"]["held_by_gate"] == len(history.registry.get(history.v3).manifest.gate.held_ids)

    refused = runner.invoke(app, ["report", "--model", "Not A Model"])
    assert refused.exit_code == 2 and "--model" in refused.output
    (tmp_path / "a-file").write_text("")
    refused = runner.invoke(app, ["report", "--out", str(tmp_path / "a-file")])
    assert refused.exit_code == 2 and "is a file, not a folder" in refused.output


def test_the_library_imports_neither_matplotlib_nor_torch_until_it_draws():
    probe = "import sys, incremental.history_report; print(sorted(m for m in ('matplotlib', 'torch', 'prefect') if m in sys.modules))"
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert shown == "[]"


def test_a_run_attaches_the_report(prefect_api, env, env_store):
    """One real run of the flow: its `history-<model>` artifact carries the chart and the tree, and the
    page and chart are on disk beside the feedback database."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from test_run_states import QUICK, retrain

    from incremental.synthetic import synthetic_feedback

    model = "reported"
    env_store.add_many(synthetic_feedback(40, 11, model=model))
    state = retrain(model=model, config=QUICK)
    summary = state.result()
    assert summary.status in ("accepted", "rejected"), state.message
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"history-{model}"])))
    assert artifact.flow_run_id == state.state_details.flow_run_id
    folder = default_report_dir(env.db_path, model)
    assert "![history chart](data:image/png;base64," in artifact.data and str(folder / "history.html") in artifact.data
    assert f"\n{summary.version}  " in artifact.data  # the tree: the new version under the base model
    assert (folder / "history.html").is_file() and (folder / "history.png").read_bytes()[:8] == PNG_SIGNATURE
