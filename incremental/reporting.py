"""What users read: the outcome of a run and the version table, as plain data and Markdown.

Knows nothing about Prefect or terminals: the CLI renders these with rich, the flow publishes
them as Prefect artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from incremental.registry import Registry

RunStatus = Literal["skipped", "accepted", "rejected"]


class RunSummary(BaseModel):
    """The outcome of one `retrain` run."""

    model_config = ConfigDict(frozen=True)

    model: str
    status: RunStatus
    version: str | None = None
    parent: str | None = None
    reasons: tuple[str, ...] = ()
    candidate_scores: dict[str, float | None] = {}
    parent_scores: dict[str, float | None] = {}
    n_new: int = 0
    n_replay: int = 0
    n_eval: int = 0
    wall_seconds: float = 0.0

    def headline(self) -> str:
        builds_on = self.parent or "base model"
        if self.status == "skipped":
            return f"Skipped: {self.reasons[0] if self.reasons else 'nothing to do'}"
        verdict = "accepted and promoted to current" if self.status == "accepted" else "rejected; current unchanged"
        return f"{self.version} (builds on {builds_on}) {verdict}"

    def to_markdown(self) -> str:
        lines = [f"# Retrain `{self.model}`: {self.status}", "", self.headline(), ""]
        if self.status != "skipped":
            lines += [
                f"Data: {self.n_new} new rows, {self.n_replay} replayed, {self.n_eval} held out.",
                "",
                "| metric | candidate | parent |",
                "|---|---|---|",
            ]
            for metric in sorted(set(self.candidate_scores) | set(self.parent_scores)):
                lines.append(
                    f"| {metric} | {_fmt(self.candidate_scores.get(metric))} | {_fmt(self.parent_scores.get(metric))} |"
                )
            lines += ["", "Gate:"]
        lines += [f"- {reason}" for reason in self.reasons]
        return "\n".join(lines) + "\n"


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


def version_table(registry: Registry) -> list[VersionRow]:
    """One row per finished version: its scores and their change against its parent."""
    rows = []
    for version in registry.versions():
        manifest = version.manifest
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
            )
        )
    return rows


def version_table_markdown(rows: list[VersionRow]) -> str:
    lines = [
        "| version | parent | status | current | target NLL (Δ vs parent) | prompt gain (Δ vs parent) | created |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.parent} | {row.status} | {'◀ current' if row.current else ''} | "
            f"{_fmt(row.target_nll)} ({_signed(row.nll_delta)}) | {_fmt(row.prompt_gain)} ({_signed(row.gain_delta)}) | "
            f"{row.created} |"
        )
    return "\n".join(lines) + "\n"


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"
