"""What users read: the outcome of a run and the version table, as plain data and Markdown.

Knows nothing about Prefect or terminals: the CLI renders these with rich, the flow publishes
them as Prefect artifacts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from incremental import layout
from incremental.feedback.lineage import UNRECORDED_GENERATOR
from incremental.registry import Registry

RunStatus = Literal["skipped", "accepted", "rejected"]


class RunSummary(BaseModel):
    """The outcome of one `retrain` run."""

    model_config = ConfigDict(frozen=True)

    model: str
    status: RunStatus
    version: str | None = None
    parent: str | None = None
    lineage: tuple[str, ...] = ()  # the current version's lineage after the run, newest first
    reasons: tuple[str, ...] = ()
    candidate_scores: dict[str, float | None] = {}
    parent_scores: dict[str, float | None] = {}
    n_new: int = 0
    n_replay: int = 0
    n_eval: int = 0
    verdict: str | None = None  # the gate's: accept, reject or inconclusive
    checks: tuple[dict, ...] = ()  # the gate's per-metric, per-slice records
    n_screened: int = 0  # new rows held by screening before training
    n_held: int = 0  # rows held because the gate blamed the batch (or they waited max_waits times already)
    n_waiting: int = 0  # new rows of an undecided candidate: new again next run, not held
    evaluation: dict = {}
    wall_seconds: float = 0.0  # from resolving the parent to the decision (the slot wait excluded)
    stage_seconds: dict[str, float] = {}  # each stage's wall time as the flow saw it, by task name
    training: dict = {}  # steps, tokens_per_second, pad_per_real_token, mfu, peak_flops (manifest.TrainingRecord)

    def overhead_seconds(self) -> float | None:
        """The run's time outside its stages: the flow's own bookkeeping between them."""
        return round(self.wall_seconds - sum(self.stage_seconds.values()), 1) if self.stage_seconds else None

    def headline(self) -> str:
        builds_on = self.parent or "base model"
        if self.status == "skipped":
            return f"Skipped: {self.reasons[0] if self.reasons else 'nothing to do'}"
        verdict = "accepted and promoted to current" if self.status == "accepted" else "rejected; current unchanged"
        waiting = f"; not sure yet: {self.n_waiting} rows wait for more evidence" if self.n_waiting else ""
        return f"{self.version} (builds on {builds_on}) {verdict}{waiting}"

    def to_markdown(self) -> str:
        lines = [f"# Retrain `{self.model}`: {self.status}", "", self.headline(), ""]
        if self.n_screened:
            lines += [f"Screening held {self.n_screened} suspect new rows before training (release them with `incremental feedback release`).", ""]
        if self.status != "skipped":
            lines += [f"Data: {self.n_new} new rows, {self.n_replay} replayed, {self.n_eval} eval rows.", ""]
            if self.verdict:
                lines += [f"Gate verdict: **{self.verdict}**", "", verdict_table_markdown(self.checks), ""]
            if self.n_held:
                lines += [f"The gate held {self.n_held} rows of this batch until a person releases or excludes them.", ""]
            if self.n_waiting:
                lines += [f"Not sure yet: {self.n_waiting} new rows wait for more evidence; the next run trains on them with what arrives.", ""]
            if self.training.get("tokens_per_second"):
                lines += [_training_line(self.training), ""]
            if self.stage_seconds:
                slowest = sorted(self.stage_seconds.items(), key=lambda item: -item[1])[:4]
                shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in slowest)
                lines += [f"Time: {self.wall_seconds:.1f} s ({shown}; between stages {self.overhead_seconds():.1f} s).", ""]
            lines += ["Reasons:"]
        lines += [f"- {reason}" for reason in self.reasons]
        return "\n".join(lines) + "\n"


def _training_line(record: dict) -> str:
    mfu, peak = record.get("mfu"), record.get("peak_flops")
    efficiency = f", MFU {100 * mfu:.1f} % of a measured {peak / 1e9:,.0f} GFLOP/s peak" if mfu and peak else ""
    padding = record.get("pad_per_real_token")
    padded = f", {padding:.2f} pad tokens per real token" if padding is not None else ""
    return f"Training: {record.get('steps')} steps, {record['tokens_per_second']:,.0f} real tokens/s{padded}{efficiency}."


@dataclass(frozen=True)
class VersionRow:
    name: str
    parent: str
    status: str
    current: bool
    target_nll: float | None
    nll_delta: float | None
    prompt_gain: float | None
    gain_delta: float | None
    created: str
    problem: str | None = None  # why the version must not be used: damaged files, unreadable manifest
    promotion: str | None = None  # promoted | interrupted | kept (Registry's VersionInfo.promotion_state)


def version_table(registry: Registry) -> list[VersionRow]:
    """One row per finished version: its scores and their change against its parent, and its problems."""
    rows = []
    for version in registry.versions():
        manifest = version.manifest
        if manifest is None:  # unreadable manifest: listed with its problem, nothing else is known
            rows.append(
                VersionRow(
                    name=version.name, parent="?", status="damaged", current=version.is_current, target_nll=None,
                    nll_delta=None, prompt_gain=None, gain_delta=None, created="?", problem=version.problem,
                )
            )  # fmt: skip
            continue
        candidate, parent = manifest.scores.get("candidate", {}), manifest.scores.get("parent", {})
        rows.append(
            VersionRow(
                name=version.name,
                parent=manifest.parent or "base",
                status=manifest.status,
                current=version.is_current,
                target_nll=candidate.get("target_nll"),
                nll_delta=_delta(candidate.get("target_nll"), parent.get("target_nll")),
                prompt_gain=candidate.get("prompt_gain"),
                gain_delta=_delta(candidate.get("prompt_gain"), parent.get("prompt_gain")),
                created=manifest.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                problem=version.problem,
                promotion=version.promotion_state,
            )
        )
    return rows


def version_table_markdown(rows: list[VersionRow]) -> str:
    """Two narrow tables that fit the Prefect UI's artifact pane: the lineage (version, parent,
    outcome), then the scores against each parent. Newest first: the latest run is on top."""
    rows = sorted(rows, key=lambda row: _version_number(row.name), reverse=True)
    lines = ["| version | parent | outcome |", "|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {_short(row.parent)} | {_outcome(row)} |")
    lines += ["", "| version | target NLL | Δ NLL | prompt gain | Δ gain |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {_short(row.name)} | {_fmt(row.target_nll)} | {_signed(row.nll_delta)} | "
            f"{_fmt(row.prompt_gain)} | {_signed(row.gain_delta)} |"
        )
    return "\n".join(lines) + "\n"


def _version_number(name: str) -> int:
    """N of vN_YYYYMMDD_HHMMSS, 0 for anything else (sorts last)."""
    return layout.version_number(name) if layout.VERSION_NAME.match(name) else 0


def _short(name: str) -> str:
    """v3 for v3_20261126_070000: the date is in the lineage table already."""
    return name.split("_", 1)[0] if _version_number(name) else name


def _outcome(row: VersionRow) -> str:
    if row.problem:
        return "⚠ damaged"
    if row.status != "accepted":
        return "❌ rejected"
    if row.current:
        return "✅ current"
    return "✅ accepted (interrupted)" if row.promotion == "interrupted" else "✅ accepted"


_DATASET_COLUMNS = ("artifact_type", "new", "replay", "eval_trusted", "eval_with_batch", "rejected_outputs", "held", "screened_out")


def dataset_summary_rows(collected, snapshot, screened_types: Sequence[str] = ()) -> list[dict[str, object]]:
    """What a run trains and judges on, per artifact type (and a total row), for people reading the run:
    new train rows, replayed rows, trusted eval rows, eval rows that arrived with the batch, rejected
    outputs scored, rows held before the run, and rows screening held now (`screened_types`: one
    artifact type per screened row). `collected` is after screening (`CollectedFeedback`), `snapshot`
    the written `DatasetSnapshot`."""
    counts: dict[str, Counter] = {}

    def add(column: str, types) -> None:
        for artifact_type in types:
            counts.setdefault(artifact_type, Counter())[column] += 1

    add("new", collected.new.column("artifact_type").to_pylist())
    train = snapshot.read_train().select(["id", "artifact_type"])
    replay = set(snapshot.replay_ids)
    add("replay", (t for i, t in zip(train.column("id").to_pylist(), train.column("artifact_type").to_pylist()) if i in replay))
    for artifact_type, trusted in zip(collected.eval.column("artifact_type").to_pylist(), collected.eval.column("trusted").to_pylist()):
        add("eval_trusted" if trusted else "eval_with_batch", [artifact_type])
    add("rejected_outputs", collected.rejected.column("artifact_type").to_pylist())
    add("held", collected.held.column("artifact_type").to_pylist())
    add("screened_out", screened_types)
    rows = [{"artifact_type": t, **{c: counts[t][c] for c in _DATASET_COLUMNS[1:]}} for t in sorted(counts)]
    rows.append({"artifact_type": "total", **{c: sum(row[c] for row in rows) for c in _DATASET_COLUMNS[1:]}})
    return rows


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


_VERDICT_COLUMNS = ("metric", "slice", "n", "parent", "candidate", "delta", "interval", "margin", "verdict")


def verdict_table_rows(checks) -> list[dict[str, str]]:
    """The gate's checks as table rows (metric, slice, n, parent, candidate, delta, interval, margin, verdict).

    Takes `gate.Check` objects or their `as_record()` dicts (as stored in a manifest).
    """
    rows = []
    for check in checks:
        record = check if isinstance(check, dict) else check.as_record()
        interval = "—" if record["low"] is None else f"[{record['low']:+.4f}, {record['high']:+.4f}]"
        verdict = record["outcome"] if record["gated"] else f"{record['outcome']} (not gated)" if record["outcome"] != "reported" else "reported"
        if record.get("more_rows"):  # power: what it would take to decide (older manifests have no such key)
            verdict += f" (+{record['more_rows']} rows to decide)"
        where = record["slice"] if not record.get("group") else f"{record['slice']} · {record['group']}"
        rows.append(
            {
                "metric": record["metric"], "slice": where, "n": str(record["n"]),
                "parent": _fmt(record["parent"]), "candidate": _fmt(record["candidate"]), "delta": _signed(record["delta"]),
                "interval": interval, "margin": _fmt(record["margin"]), "verdict": verdict,
            }
        )  # fmt: skip
    return rows


def verdict_table_markdown(checks) -> str:
    lines = ["| " + " | ".join(_VERDICT_COLUMNS) + " |", "|" + "---|" * len(_VERDICT_COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in _VERDICT_COLUMNS) + " |" for row in verdict_table_rows(checks)]
    return "\n".join(lines)


def explain_version(registry: Registry, name: str) -> str:
    """Why a version was accepted or rejected, in Markdown: data, verdict table, reasons, promotion."""
    info = registry.get(name)
    manifest = info.manifest
    gate, data = manifest.gate, manifest.data
    lines = [
        f"# {manifest.name} ({manifest.status})",
        "",
        f"Builds on {manifest.parent or 'the base model'}; base {manifest.base_model.id} @ {manifest.base_model.revision}.",
        f"Trained on {len(data.new_ids)} new + {len(data.replay_ids)} replayed rows; judged on {len(data.eval_ids)} eval rows "
        f"({len(data.arrived_with_batch_ids)} of the eval and rejected-output rows arrived with the batch and were not trusted).",
    ]
    if data.new_by_generating_version:
        shown = ", ".join(
            f"{count} with none recorded" if version == UNRECORDED_GENERATOR else f"{count} by {version}"
            for version, count in data.new_by_generating_version.items()
        )
        lines.append(f"New rows by the version that generated them: {shown}.")
    if data.screened_ids:
        lines.append(f"Screening held {len(data.screened_ids)} suspect new rows before training.")
    if gate.held_ids:
        lines.append(f"The gate blamed the batch: {len(gate.held_ids)} rows held.")
    lines += ["", f"Gate verdict: **{gate.verdict}**", ""]
    if gate.checks:
        lines += [verdict_table_markdown(gate.checks), ""]
    lines += ["Reasons:"] + [f"- {reason}" for reason in gate.reasons]
    if manifest.promotion is not None:
        outcome = {
            "promoted": "promoted",
            "kept": "not promoted",
            "interrupted": "not promoted (interrupted: the run stopped before the pointer moved)",
        }[info.promotion_state]
        lines += ["", f"Promotion: {outcome}: {manifest.promotion.reason}"]
    problems = registry.verify(name)
    if problems:
        lines += ["", f"**Damaged**, refused for loading, training and rollback: {'; '.join(problems)}"]
    if gate.evaluation:
        lines += ["", "Evaluation: " + ", ".join(f"{k} {v}" for k, v in sorted(gate.evaluation.items()))]
    return "\n".join(lines) + "\n"
