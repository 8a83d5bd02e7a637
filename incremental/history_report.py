"""A model's whole history as a report: a self-contained HTML page and a PNG chart.

`gather_history` reads the version tree (manifests, pointer moves) and the feedback store (counts,
holds and exclusions) into a frozen `HistoryReport`; `render_chart`, `render_html` and
`history_markdown` draw it; `write_report` writes the page and the chart. The version rows come from
`reporting.version_table` and the gate's checks are formatted by `reporting.verdict_table_rows`, so
the report says what `incremental versions` says. Knows nothing about Prefect or terminals;
matplotlib is imported inside `chart_figure` only (an Agg canvas, no pyplot).
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from incremental.errors import RegistryError
from incremental.feedback import FeedbackCounts, FeedbackStore
from incremental.feedback.lineage import UNRECORDED_GENERATOR
from incremental.gate import METRICS
from incremental.layout import version_number
from incremental.registry import Registry
from incremental.reporting import VersionRow, verdict_table_rows, version_table
from incremental.waiting import waiting_rows

__all__ = [
    "CHART_DPI",
    "CHART_SIZE_PX",
    "DataVolume",
    "FeedbackSummary",
    "HistoryReport",
    "MarkGroup",
    "PointerMove",
    "ReportFiles",
    "VersionEntry",
    "chart_figure",
    "default_report_dir",
    "gather_history",
    "history_markdown",
    "lineage_tree_lines",
    "render_chart",
    "render_html",
    "write_report",
]

HTML_FILE = "history.html"
PNG_FILE = "history.png"
# The chart's size is fixed whatever the history holds, so a page, an artifact and a test can rely on it.
CHART_SIZE_PX = (1200, 1150)
CHART_DPI = 100
MAX_IDS_SHOWN = 10  # ids listed per group of held or excluded rows; the count is always the whole group
# Beyond this many versions the chart names only the current version and the ends of rollbacks, and
# writes no counts on the bars: the labels would overlap.
LABELLED_VERSIONS = 40
BASE = "base model"


@dataclass(frozen=True)
class DataVolume:
    """What a version trained and was judged on, counted from its manifest's data and gate records."""

    new: int
    replay: int
    eval: int
    rejected: int  # 'needs_improvement' rows without a correction: scored, never trained
    arrived_with_batch: int  # eval and rejected-output rows that arrived with the batch: reported, never trusted
    screened: int  # new rows screening held before training
    held_by_gate: int  # rows held because the gate blamed the batch
    train_examples: int
    # New rows per version that generated their output (`incremental rate`); 'unrecorded' when none is known.
    by_generating_version: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionEntry:
    """One finished version: its row of the version table, its verdict and checks, its data."""

    row: VersionRow
    verdict: str | None  # accept | reject | inconclusive; None for a damaged version
    reasons: tuple[str, ...]
    checks: tuple[dict, ...]  # the manifest's gate records (metric, slice, n, candidate, parent, delta, low, high, margin, outcome, gated)
    confidence: float | None  # the interval's two-sided level, from the recorded policy
    data: DataVolume | None  # None for a damaged version
    on_lineage: bool  # the current version or one of its ancestors
    held_now: int  # rows held today whose hold names this version (its rejected batch or its screening)

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def number(self) -> int:
        return version_number(self.row.name)


@dataclass(frozen=True)
class PointerMove:
    """One line of `history.jsonl`: a promotion or a rollback; None is the base model."""

    at: str
    action: str  # promote | rollback
    source: str | None
    target: str | None
    reason: str
    forced: bool


@dataclass(frozen=True)
class MarkGroup:
    """Rows that are held (or excluded) today by the same decision: same version, actor and reason."""

    state: Literal["held", "excluded"]
    version: str | None
    actor: str
    reason: str
    count: int
    ids: tuple[str, ...]  # the first MAX_IDS_SHOWN
    since: datetime  # the newest of the deciding marks


@dataclass(frozen=True)
class FeedbackSummary:
    """The store as the current lineage sees it (`FeedbackStore.counts`), and who holds or excluded what."""

    counts: FeedbackCounts
    held: tuple[MarkGroup, ...]
    excluded: tuple[MarkGroup, ...]


@dataclass(frozen=True)
class HistoryReport:
    model: str
    generated_at: datetime
    current: str | None
    lineage: tuple[str, ...]  # current first
    versions: tuple[VersionEntry, ...]  # oldest first
    moves: tuple[PointerMove, ...]  # oldest first
    feedback: FeedbackSummary | None  # None when there is no feedback database yet
    problems: tuple[str, ...] = ()  # why the pointer or the lineage could not be read (the rest is still shown)
    waiting: int = 0  # rows undecided candidates of the current version trained: new again, not held
    waiting_since: datetime | None = None

    def rollbacks(self) -> tuple[PointerMove, ...]:
        return tuple(move for move in self.moves if move.action == "rollback")

    def to_record(self) -> dict[str, Any]:
        """The report as JSON-ready data (datetimes stay datetimes: the caller's encoder writes them)."""
        return asdict(self)


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    png: Path


def default_report_dir(db_path: Path, model: str) -> Path:
    """`reports/<model>/` beside the feedback database: the version tree holds versions only."""
    return Path(db_path).parent / "reports" / model


# ---- gathering -----------------------------------------------------------------------------------


def gather_history(registry: Registry, store: FeedbackStore | None, *, now: datetime | None = None) -> HistoryReport:
    """Everything the report shows, read once: versions (with their file checks), pointer moves, feedback.

    `store` None: no database yet, so no feedback section (the report never creates one).
    """
    problems: list[str] = []
    try:
        current = registry.current()
        lineage = tuple(registry.lineage(current)) if current else ()
    except RegistryError as error:  # a broken pointer or lineage is what the report must show, not a reason to fail
        problems.append(str(error))
        current, lineage = None, ()
    rows = version_table(registry)
    infos = {info.name: info for info in registry.versions(check_files=False)}
    manifest = infos[current].manifest if current in infos else None
    accepted_at = manifest.finalized_at if manifest is not None else None
    feedback = _feedback_summary(registry.model, store, lineage, accepted_at) if store is not None else None
    held_per_version: dict[str, int] = {}
    for group in feedback.held if feedback else ():
        if group.version is not None:
            held_per_version[group.version] = held_per_version.get(group.version, 0) + group.count
    entries = []
    for row in rows:
        manifest = infos[row.name].manifest if row.name in infos else None
        entries.append(
            VersionEntry(
                row=row,
                verdict=manifest.gate.verdict if manifest else None,
                reasons=tuple(manifest.gate.reasons) if manifest else (),
                checks=tuple(manifest.gate.checks) if manifest else (),
                confidence=manifest.gate.policy.get("confidence") if manifest else None,
                data=_data_volume(manifest) if manifest else None,
                on_lineage=row.name in lineage,
                held_now=held_per_version.get(row.name, 0),
            )
        )
    moves = tuple(
        PointerMove(
            at=str(entry.get("at", "")), action=str(entry.get("action", "?")), source=entry.get("from"),
            target=entry.get("to"), reason=str(entry.get("reason") or ""), forced=bool(entry.get("forced", False)),
        )
        for entry in registry.history()
    )  # fmt: skip
    waiting = waiting_rows(infos.values(), current)
    return HistoryReport(
        model=registry.model, generated_at=now or datetime.now(timezone.utc), current=current, lineage=lineage,
        versions=tuple(entries), moves=moves, feedback=feedback, problems=tuple(problems),
        waiting=len(waiting.ids), waiting_since=waiting.since,
    )  # fmt: skip


def _data_volume(manifest) -> DataVolume:
    data = manifest.data
    return DataVolume(
        new=len(data.new_ids), replay=len(data.replay_ids), eval=len(data.eval_ids), rejected=len(data.rejected_ids),
        arrived_with_batch=len(data.arrived_with_batch_ids), screened=len(data.screened_ids),
        held_by_gate=len(manifest.gate.held_ids), train_examples=data.n_train_examples,
        by_generating_version=dict(data.new_by_generating_version),
    )  # fmt: skip


def _feedback_summary(model: str, store: FeedbackStore, lineage: tuple[str, ...], accepted_at: datetime | None) -> FeedbackSummary:
    counts = store.counts(model, lineage, trusted_before=accepted_at)
    # A row's state is its latest hold/release and its latest exclude/include mark, the rule the store
    # classifies by: excluded wins over held, so the groups add up to the counts.
    latest: dict[str, dict[str, Any]] = {}
    for mark in store.marks(model):  # oldest first
        kind = "hold" if mark.action in ("hold", "release") else "exclude"
        latest.setdefault(mark.feedback_id, {})[kind] = mark
    groups: dict[tuple, list] = {}
    for row_id, state in latest.items():
        exclusion, hold = state.get("exclude"), state.get("hold")
        if exclusion is not None and exclusion.action == "exclude":
            key, mark = ("excluded", exclusion.version, exclusion.actor, exclusion.reason), exclusion
        elif hold is not None and hold.action == "hold":
            key, mark = ("held", hold.version, hold.actor, hold.reason), hold
        else:
            continue
        groups.setdefault(key, []).append((row_id, mark.at))
    made = [
        MarkGroup(
            state=state, version=version, actor=actor, reason=reason, count=len(members),
            ids=tuple(sorted(row_id for row_id, _ in members)[:MAX_IDS_SHOWN]), since=max(at for _, at in members),
        )
        for (state, version, actor, reason), members in groups.items()
    ]  # fmt: skip
    ordered = sorted(made, key=lambda group: (group.since, group.version or "", group.actor, group.reason))
    return FeedbackSummary(
        counts=counts,
        held=tuple(group for group in ordered if group.state == "held"),
        excluded=tuple(group for group in ordered if group.state == "excluded"),
    )


# ---- the lineage tree ----------------------------------------------------------------------------


def _children(report: HistoryReport) -> dict[str | None, list[VersionEntry]]:
    """Versions under their parent (None: the base model). A damaged version, or one whose parent is not
    a finished version, hangs under the base with its problem shown."""
    known = {entry.name for entry in report.versions}
    children: dict[str | None, list[VersionEntry]] = {}
    for entry in report.versions:
        parent = entry.row.parent if entry.row.parent in known else None
        children.setdefault(parent, []).append(entry)
    return children


def _badges(report: HistoryReport, entry: VersionEntry | None) -> list[tuple[str, str]]:
    """(css class, text) markers of a tree node; `entry` None is the base model."""
    name = entry.name if entry else None
    badges: list[tuple[str, str]] = []
    if entry is not None:
        row = entry.row
        if row.problem:
            badges.append(("damaged", "⚠ damaged"))
        elif row.status == "accepted":
            badges.append(("accepted", "✓ accepted"))
        else:
            badges.append(("rejected", f"✗ rejected ({entry.verdict})" if entry.verdict else "✗ rejected"))
        if row.promotion == "interrupted":
            badges.append(("interrupted", "interrupted before promotion"))
        if row.status == "accepted" and not row.problem and not entry.on_lineage and row.promotion != "interrupted":
            badges.append(("off", "off the current lineage"))
    if name == report.current:
        badges.append(("current", "★ current"))
    for move in report.rollbacks():
        if move.target == name:
            badges.append(("rollback", f"↩ rollback from {_short(move.source)} ({move.at[:16].replace('T', ' ')})"))
        if move.source == name and name is not None:
            badges.append(("rollback-from", f"↪ rolled back to {_short(move.target)}"))
    return badges


def _tree_rows(report: HistoryReport) -> list[tuple[str, VersionEntry | None]]:
    """The tree as rows, oldest first, each with its text guide, like `git log --graph`: a version builds on
    the nearest version above it in its column; `├─ ` opens a branch off the version above. The current
    lineage is column 0, so a long history grows longer, never wider. (The base model is None.)"""
    children = _children(report)
    rows: list[tuple[str, VersionEntry | None]] = [("", None)]
    # An explicit stack, not recursion: a lineage may be thousands of versions long.
    stack: list[tuple[str, str | None, int]] = [("children", None, 0)]
    while stack:
        task, name, depth = stack.pop()
        if task != "children":
            entry = next(e for e in report.versions if e.name == name)
            guide = "│  " * (depth - 1) + ("├─ " if task == "opens" else "│  ") if depth else ""
            rows.append((guide, entry))
            continue
        kids = children.get(name, [])
        if not kids:
            continue
        main = _main_child(kids)
        stack += [("children", main.name, depth), ("continues", main.name, depth)]
        for side in reversed([kid for kid in kids if kid is not main]):
            stack += [("children", side.name, depth + 1), ("opens", side.name, depth + 1)]
    return rows


def _main_child(kids: list[VersionEntry]) -> VersionEntry:
    """The child that continues its parent's column: the one on the current lineage, else the newest
    accepted one, else the newest."""
    on_lineage = [kid for kid in kids if kid.on_lineage]
    accepted = [kid for kid in kids if kid.row.status == "accepted" and not kid.row.problem]
    return (on_lineage or accepted or kids)[-1]


def lineage_tree_lines(report: HistoryReport) -> list[str]:
    """The lineage as a text tree (see `_tree_rows`), each version with its markers and data counts."""
    return [
        f"{guide}{entry.name if entry else BASE}{_badge_text(_badges(report, entry))}{_data_text(entry) if entry else ''}"
        for guide, entry in _tree_rows(report)
    ]


def _badge_text(badges: list[tuple[str, str]]) -> str:
    return "".join(f"  {text}" for _, text in badges)


def _data_text(entry: VersionEntry) -> str:
    data = entry.data
    return "" if data is None else f"  [{data.new} new, {data.replay} replay, {data.eval} eval]"


def _short(name: str | None) -> str:
    return BASE if name is None else name.split("_", 1)[0]


# ---- the chart -----------------------------------------------------------------------------------

_COLOURS = {
    "accepted": "#2e7d32", "rejected": "#c62828", "damaged": "#757575", "current": "#f9a825", "rollback": "#6a1b9a",
    "pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#ef6c00", "too few rows": "#ef6c00", "not shown worse": "#9e9d24",
    "new": "#1565c0", "replay": "#90caf9", "eval": "#ef6c00", "screened": "#8d6e63", "held by gate": "#c62828",
}  # fmt: skip


def _lanes(report: HistoryReport) -> dict[str | None, int]:
    """Rows of the tree drawing: the current lineage (and the base) on lane 0. Off it, a version continues
    its parent's lane when its parent is that lane's last version; otherwise its branch takes the first
    lane that is free from the parent's x on (x is the version number), so rejected candidates of
    successive versions share a lane instead of each opening one."""
    lanes: dict[str | None, int] = {None: 0}
    lanes.update({name: 0 for name in report.lineage})
    known = {entry.name for entry in report.versions}
    number = {entry.name: entry.number for entry in report.versions}
    ends: dict[int, tuple[int, str]] = {}  # lane -> (x of its last version, its name)
    for entry in report.versions:
        if entry.name in lanes:
            continue
        parent = entry.row.parent if entry.row.parent in known else None
        lane = lanes.get(parent, 0)
        if lane == 0 or ends.get(lane, (0, None))[1] != parent:
            start = number.get(parent, 0)
            lane = next(k for k in range(1, len(ends) + 2) if k not in ends or ends[k][0] < start)
        lanes[entry.name] = lane
        ends[lane] = (entry.number, entry.name)
    return lanes


def render_chart(report: HistoryReport) -> bytes:
    """The history as one PNG of exactly CHART_SIZE_PX (see `chart_figure`)."""
    from io import BytesIO

    buffer = BytesIO()
    chart_figure(report).savefig(buffer, format="png", dpi=CHART_DPI)
    return buffer.getvalue()


def chart_figure(report: HistoryReport):
    """The chart as a matplotlib Figure on an Agg canvas (no pyplot, no global state): the lineage tree
    with rollbacks (axes labelled `lineage`), each gated metric's change against the parent with the
    gate's interval and margin (`gate:<metric>`), the rows per version (`data`), and what users receive:
    each version's artifact validity and content F1 per type on the rows it was judged on (`quality:<metric>`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def version_axis(axes, left: float) -> None:
        axes.set_xlim(left, x_max + 0.6)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"v{x:.0f}" if x >= 1 else "base" if x == 0 else ""))
        axes.tick_params(labelsize=8)

    width, height = CHART_SIZE_PX
    figure = Figure(figsize=(width / CHART_DPI, height / CHART_DPI), dpi=CHART_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(4, 1, height_ratios=(1.15, 1, 1, 1))
    numbers = [entry.number for entry in report.versions]
    x_max = max(numbers, default=1)

    # Lineage: x is the version number (0 the base), y the lane.
    tree = figure.add_subplot(grid[0])
    tree.set_label("lineage")
    lanes = _lanes(report)
    position = {None: (0.0, 0.0)}
    position.update({entry.name: (float(entry.number), -float(lanes[entry.name])) for entry in report.versions})
    for entry in report.versions:
        parent = entry.row.parent if entry.row.parent in position else None
        (px, py), (x, y) = position[parent], position[entry.name]
        colour = _COLOURS["accepted"] if entry.on_lineage else "#9e9e9e"
        tree.plot([px, px, x], [py, y, y], color=colour, linewidth=2 if entry.on_lineage else 1.2, zorder=1)
    few = len(report.versions) <= LABELLED_VERSIONS
    named = {report.current} | {move.source for move in report.rollbacks()} | {move.target for move in report.rollbacks()}
    tree.scatter([0], [0], marker="s", s=90, color="black", zorder=3)
    tree.annotate("base", (0, 0), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
    for entry in report.versions:
        x, y = position[entry.name]
        kind = "damaged" if entry.row.problem else entry.row.status
        if entry.name == report.current:
            tree.scatter([x], [y], marker="*", s=520, color=_COLOURS["current"], zorder=2)
        tree.scatter([x], [y], marker="o" if kind == "accepted" else "X" if kind == "rejected" else "D", s=70,
                     color=_COLOURS.get(kind, _COLOURS["damaged"]), zorder=3)  # fmt: skip
        if few or entry.name in named:
            tree.annotate(_short(entry.name), (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
    for move in report.rollbacks():
        if move.source in position and move.target in position:
            arrow = FancyArrowPatch(
                position[move.source], position[move.target], connectionstyle="arc3,rad=0.35", arrowstyle="-|>",
                mutation_scale=14, linestyle="--", color=_COLOURS["rollback"], linewidth=1.4, zorder=2,
            )  # fmt: skip
            tree.add_patch(arrow)
    lowest = -max(lanes.values(), default=0)
    version_axis(tree, -0.6)
    pad = max(0.7, 0.06 * (1 - lowest))  # room for the labels above and below, in lanes
    tree.set_ylim(lowest - pad, pad + 0.2)
    tree.set_yticks([])
    current = f"current {report.current}" if report.current else "Base Mode (no current version)"
    tree.set_title(f"Lineage of {report.model}: {current}", fontsize=11, loc="left")
    tree.legend(
        handles=[
            Line2D([], [], marker="o", linestyle="", color=_COLOURS["accepted"], label="accepted"),
            Line2D([], [], marker="X", linestyle="", color=_COLOURS["rejected"], label="rejected"),
            Line2D([], [], marker="*", linestyle="", markersize=14, color=_COLOURS["current"], label="current"),
            Line2D([], [], linestyle="--", color=_COLOURS["rollback"], label="rollback"),
            Line2D([], [], color="#9e9e9e", label="off the current lineage"),
        ],
        loc="lower right", fontsize=8, ncols=5, frameon=False,
    )  # fmt: skip

    # The gate: each gated metric's change against the parent, with its interval and margin.
    metrics = [spec for spec in METRICS if any(_charted(c, spec.name) for e in report.versions for c in e.checks)]
    cells = grid[1].subgridspec(1, max(1, len(metrics)))
    if not metrics:
        empty = figure.add_subplot(cells[0])
        empty.set_label("gate")
        empty.text(0.5, 0.5, "no gated checks with an interval yet", ha="center", va="center", transform=empty.transAxes)
        empty.set_axis_off()
    offsets = {"regression": -0.12, "all": 0.0, "golden": 0.12}
    for column, spec in enumerate(metrics):
        axes = figure.add_subplot(cells[column])
        axes.set_label(f"gate:{spec.name}")
        axes.axhline(0, color="#bdbdbd", linewidth=1)
        for entry in report.versions:
            for check in entry.checks:
                if not _charted(check, spec.name):
                    continue
                x = entry.number + offsets.get(check["slice"], 0.0)
                delta = check["delta"]
                colour = _COLOURS.get(check["outcome"], "#616161")
                axes.errorbar([x], [delta], yerr=[[delta - check["low"]], [check["high"] - delta]], fmt="o",
                              color=colour, markersize=4, capsize=3)  # fmt: skip
                if check["margin"] is not None:
                    allowed = check["margin"] if not spec.higher_is_better else -check["margin"]
                    axes.plot([x - 0.2, x + 0.2], [allowed, allowed], color="#616161", linestyle=":", linewidth=1.5)
        version_axis(axes, 0.4)
        better = "higher" if spec.higher_is_better else "lower"
        axes.set_title(f"{spec.label[:40]}: Δ vs parent ({better} is better)", fontsize=9, loc="left")
    if metrics:
        first = figure.axes[-len(metrics)]
        first.set_ylabel("candidate − parent", fontsize=8)
        first.legend(
            handles=[
                Line2D([], [], marker="o", linestyle="", color=_COLOURS[name], label=name) for name in ("pass", "fail", "inconclusive")
            ] + [Line2D([], [], linestyle=":", color="#616161", label="margin")],
            fontsize=7, loc="best",
        )  # fmt: skip

    # Data volume per version: train (new + replay), eval, and rows held (screened + by the gate).
    volume = figure.add_subplot(grid[2])
    volume.set_label("data")
    with_data = [entry for entry in report.versions if entry.data is not None]
    xs = [entry.number for entry in with_data]
    width_bar = 0.27

    def bars(offset: float, label: str, values: list[int], bottom: list[int] | None = None, total: bool = False) -> None:
        drawn = volume.bar([x + offset for x in xs], values, width_bar, bottom=bottom, label=label, color=_COLOURS[label])
        if total and few:  # the stack's height, written on top of it
            tops = [value + (bottom[i] if bottom else 0) for i, value in enumerate(values)]
            volume.bar_label(drawn, labels=[str(top) if top else "" for top in tops], fontsize=7, padding=1)

    new = [entry.data.new for entry in with_data]
    screened = [entry.data.screened for entry in with_data]
    bars(-width_bar, "new", new)
    bars(-width_bar, "replay", [entry.data.replay for entry in with_data], bottom=new, total=True)
    bars(0.0, "eval", [entry.data.eval for entry in with_data], total=True)
    bars(width_bar, "screened", screened)
    bars(width_bar, "held by gate", [entry.data.held_by_gate for entry in with_data], bottom=screened, total=True)
    version_axis(volume, 0.4)
    tallest = max((max(d.new + d.replay, d.eval, d.screened + d.held_by_gate) for d in (e.data for e in with_data)), default=1)
    volume.set_ylim(0, max(tallest, 1) * 1.3)  # room for the legend above the bars
    volume.set_ylabel("rows", fontsize=8)
    volume.legend(fontsize=8, ncols=5, loc="upper left")
    title = "Rows per version: trained (new + replay), judged (eval), held (screened + by the gate)"
    if report.feedback is not None:
        counts = report.feedback.counts
        title += f"; feedback now: {counts.held} held, {counts.excluded} excluded of {counts.total}"
    volume.set_title(title, fontsize=9, loc="left")

    # What users receive: each version's generation quality per artifact type, as its gate measured it.
    cells = grid[3].subgridspec(1, 2)
    for column, metric in enumerate(("artifact_validity", "content_f1")):
        axes = figure.add_subplot(cells[column])
        axes.set_label(f"quality:{metric}")
        series = quality_series(report, metric)
        for group, points in series.items():
            xs_, ys_ = zip(*points)
            axes.plot(xs_, ys_, marker="o", markersize=4, linewidth=1.2, label=group, color=_TYPE_COLOURS.get(group, "#616161"),
                      linestyle="-" if group != "all types" else "--")  # fmt: skip
        if not series:
            axes.text(0.5, 0.5, "no generation scores yet", ha="center", va="center", transform=axes.transAxes)
        version_axis(axes, 0.4)
        axes.set_ylim(-0.05, 1.05)
        label = "valid artifacts (share)" if metric == "artifact_validity" else "content F1"
        axes.set_title(f"What users receive: {label} per type, each version on its judged rows", fontsize=9, loc="left")
        if series:
            axes.legend(fontsize=7, ncols=4, loc="lower right")
    return figure


_TYPE_COLOURS = {"erd": "#1565c0", "api": "#6a1b9a", "prototype": "#ef6c00", "all types": "#424242"}


def quality_series(report: HistoryReport, metric: str) -> dict[str, list[tuple[int, float]]]:
    """{artifact type (or 'all types'): [(version number, the version's value)]} of a generation metric,
    read from each version's gate checks on its judged slice (the candidate's side)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in report.versions:
        for check in entry.checks:
            if check.get("metric") != metric or check.get("slice") not in ("regression", "all") or check.get("candidate") is None:
                continue
            series.setdefault(check.get("group") or "all types", []).append((entry.number, float(check["candidate"])))
    return series


def _charted(check: dict, metric: str) -> bool:
    """Pooled gated checks of `metric` with an interval: the ones the gate decided on (per-type ones are in the quality chart)."""
    return (
        check.get("metric") == metric and check.get("gated") and check.get("group") is None
        and check.get("low") is not None and check.get("delta") is not None
    )  # fmt: skip


# ---- the page ------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #212121; margin: 24px auto; max-width: 1320px; padding: 0 16px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #e0e0e0; padding-bottom: 4px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; }
.meta { color: #616161; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #e0e0e0; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; white-space: normal; } td.text, th.text { text-align: left; white-space: normal; }
ul.tree { list-style: none; margin: 0; padding: 0; }
ul.tree li { padding: 1px 0; white-space: nowrap; }
.guide { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre; color: #9e9e9e; }
.name { font-weight: 600; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
td.name, td.when { white-space: nowrap; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; margin-left: 6px; font-size: 12px; border: 1px solid; }
.accepted { color: #1b5e20; border-color: #66bb6a; background: #e8f5e9; }
.rejected, .damaged { color: #b71c1c; border-color: #ef5350; background: #ffebee; }
.current { color: #5d4037; border-color: #f9a825; background: #fff8e1; font-weight: 600; }
.rollback, .rollback-from { color: #4a148c; border-color: #ab47bc; background: #f3e5f5; }
.off, .interrupted { color: #616161; border-color: #bdbdbd; background: #fafafa; }
td.accepted, td.rejected, td.damaged { border-color: #e0e0e0; }
.data { color: #616161; font-size: 12px; margin-left: 6px; }
.pass { color: #1b5e20; } .fail { color: #b71c1c; font-weight: 600; } .inconclusive, .too-few-rows { color: #e65100; font-weight: 600; }
img.chart { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
.wide { overflow-x: auto; max-width: 100%; }
details { margin: 6px 0 10px; } summary { cursor: pointer; }
ul.reasons { margin: 2px 0 8px; color: #424242; }
"""


def render_html(report: HistoryReport, chart_png: bytes | None = None) -> str:
    """One page with everything inline: styles, the chart as a data URL; no script, no external address.

    Numbers sit in cells with `data-field` (and rows with `data-version`) so a reader, or a test, can
    find them."""
    e = html.escape
    versions = report.versions
    n_accepted = sum(1 for entry in versions if entry.row.status == "accepted" and not entry.row.problem)
    n_rejected = sum(1 for entry in versions if entry.row.status == "rejected")
    lineage = " ← ".join([*report.lineage, "base"]) if report.lineage else "base"
    mode = f"Incremental Mode, current <b>{e(report.current)}</b>" if report.current else "Base Mode (no current version)"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>History of {e(report.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>History of <code>{e(report.model)}</code></h1>",
        (
            f'<p class="meta">{mode}; lineage {e(lineage)}. {_plural(len(versions), "version")}: {n_accepted} accepted, '
            f"{n_rejected} rejected; {_plural(len(report.rollbacks()), 'rollback')}. Generated "
            f"{e(report.generated_at.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p>"
        ),
        *([f'<p class="meta" id="waiting">{e(_waiting_line(report))}</p>'] if report.waiting else []),
        *(f'<p class="damaged">⚠ {e(problem)}</p>' for problem in report.problems),
        '<section id="lineage"><h2>Lineage</h2>',
        _tree_html(report),
        "</section>",
    ]
    if chart_png is not None:
        encoded = base64.b64encode(chart_png).decode("ascii")
        parts += [
            '<section id="chart"><h2>Chart</h2>',
            (
                f'<img class="chart" alt="Lineage, the gate\'s intervals and the rows per version of {e(report.model)}" '
                f'width="{CHART_SIZE_PX[0]}" height="{CHART_SIZE_PX[1]}" src="data:image/png;base64,{encoded}">'
            ),
            "</section>",
        ]
    parts += ['<section id="moves"><h2>Pointer moves</h2>', _moves_html(report), "</section>"]
    parts += ['<section id="versions"><h2>Versions: scores and data</h2>', _versions_html(report), "</section>"]
    parts += ['<section id="verdicts"><h2>Gate verdicts</h2>', _verdicts_html(report), "</section>"]
    parts += ['<section id="feedback"><h2>Held and excluded feedback</h2>', _feedback_html(report.feedback), "</section>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _badges_html(badges: list[tuple[str, str]]) -> str:
    return "".join(f'<span class="badge {css}">{html.escape(text)}</span>' for css, text in badges)


def _tree_html(report: HistoryReport) -> str:
    e = html.escape
    items = []
    for guide, entry in _tree_rows(report):
        name = entry.name if entry else BASE
        data = entry.data if entry else None
        summary = "" if data is None else (
            f'<span class="data">{data.new} new, {data.replay} replay, {data.eval} eval'
            + (f"; Δ target NLL {_signed(entry.row.nll_delta)}" if entry.row.nll_delta is not None else "")
            + "</span>"
        )  # fmt: skip
        items.append(
            f'<li data-version="{e(entry.name if entry else "base")}"><span class="guide">{e(guide)}</span>'
            f'<span class="name">{e(name)}</span>{_badges_html(_badges(report, entry))}{summary}</li>'
        )
    legend = (
        '<p class="meta">Oldest first. A version builds on the nearest version above it in its column; '
        "├─ opens a branch off the version above it. Column one is the current lineage.</p>"
    )
    return f'<ul class="tree">{"".join(items)}</ul>{legend}'


def _moves_html(report: HistoryReport) -> str:
    if not report.moves:
        return "<p>The pointer never moved: nothing was promoted yet.</p>"
    e = html.escape
    rows = [
        f'<tr data-action="{e(move.action)}"><td class="text">{e(move.at[:19].replace("T", " "))}</td>'
        f'<td class="text {"rollback" if move.action == "rollback" else ""}">{e(move.action)}{" (forced)" if move.forced else ""}</td>'
        f'<td class="text">{e(move.source or BASE)}</td><td class="text">{e(move.target or BASE)}</td>'
        f'<td class="text">{e(move.reason)}</td></tr>'
        for move in report.moves
    ]
    return (
        '<table><tr><th class="text">at (UTC)</th><th class="text">move</th><th class="text">from</th>'
        f'<th class="text">to</th><th class="text">reason</th></tr>{"".join(rows)}</table>'
    )


_VOLUME_FIELDS = ("new", "replay", "eval", "rejected", "arrived_with_batch", "screened", "held_by_gate", "held_now")


def _versions_html(report: HistoryReport) -> str:
    if not report.versions:
        return "<p>No versions yet: the first run trains from the base model.</p>"
    e = html.escape
    head = (
        '<tr><th class="text">version</th><th class="text">parent</th><th class="text">status</th><th>verdict</th>'
        "<th>target NLL</th><th>Δ NLL</th><th>prompt gain</th><th>Δ gain</th>"
        "<th>new</th><th>replay</th><th>eval</th><th>rejected outputs</th><th>arrived with batch</th>"
        '<th>screened</th><th>held by gate</th><th>held now</th><th class="text">new rows by generating version</th>'
        '<th class="text">created</th></tr>'
    )
    rows = []
    for entry in reversed(report.versions):  # newest first, as `versions` shows it
        row = entry.row
        status = "damaged" if row.problem else row.status
        data = asdict(entry.data) if entry.data is not None else {}
        data["held_now"] = entry.held_now
        volume = "".join(f'<td data-field="{name}">{data.get(name, "—")}</td>' for name in _VOLUME_FIELDS)
        rows.append(
            f'<tr data-version="{e(row.name)}"><td class="text name">{e(row.name)}{" ★" if row.current else ""}</td>'
            f'<td class="text">{e(_short(row.parent) if row.parent != "base" else "base")}</td>'
            f'<td class="text {status}" data-field="status">{e(status)}</td>'
            f'<td data-field="verdict">{e(entry.verdict or "—")}</td>'
            f'<td data-field="target_nll">{_fmt(row.target_nll)}</td><td data-field="nll_delta">{_signed(row.nll_delta)}</td>'
            f'<td data-field="prompt_gain">{_fmt(row.prompt_gain)}</td><td data-field="gain_delta">{_signed(row.gain_delta)}</td>'
            f'{volume}<td class="text" data-field="by_generating_version">{e(_by_generator(entry.data))}</td>'
            f'<td class="text when">{e(row.created[:16])}</td></tr>'
        )
    return (
        f'<div class="wide"><table>{head}{"".join(rows)}</table></div><p class="meta">Scores are the candidate\'s on the '
        "judged rows (trusted rows; all rows for a first version); Δ is the change against its parent on the same rows. "
        "Times are UTC.</p>"
    )


def _by_generator(data: DataVolume | None) -> str:
    if data is None or not data.by_generating_version:
        return "—"
    return ", ".join(
        f"{count} {'unrecorded' if name == UNRECORDED_GENERATOR else 'by ' + _short(name)}"
        for name, count in data.by_generating_version.items()
    )


_CHECK_COLUMNS = ("metric", "slice", "n", "parent", "candidate", "delta", "interval", "margin", "verdict")


def _verdicts_html(report: HistoryReport) -> str:
    if not report.versions:
        return "<p>No verdicts yet.</p>"
    e = html.escape
    blocks = []
    newest = {entry.name for entry in report.versions[-8:]}  # open by default; older ones one click away
    for entry in reversed(report.versions):
        level = f", {round(entry.confidence * 100)} % interval" if entry.confidence else ""
        head = f"<summary><span class=\"name\">{e(entry.name)}</span> builds on {e(entry.row.parent)}: " \
            f"verdict <b>{e(entry.verdict or 'unknown')}</b>{level}{_badges_html(_badges(report, entry))}</summary>"
        if entry.row.problem:
            body = f"<p class=\"damaged\">{e(entry.row.problem)}</p>"
        else:
            cells = []
            for record, shown in zip(entry.checks, verdict_table_rows(entry.checks)):
                outcome = str(record.get("outcome", "")).replace(" ", "-")
                css = {"metric": "text", "slice": "text", "verdict": outcome}
                cells.append(
                    f'<tr data-metric="{e(str(record["metric"]))}" data-slice="{e(str(record["slice"]))}">'
                    + "".join(f'<td data-field="{c}" class="{css.get(c, "")}">{e(shown[c])}</td>' for c in _CHECK_COLUMNS)
                    + "</tr>"
                )
            table = (
                "<table><tr>" + "".join(f"<th>{c}</th>" for c in _CHECK_COLUMNS) + f"</tr>{''.join(cells)}</table>"
                if cells else ""
            )  # fmt: skip
            reasons = "".join(f"<li>{e(reason)}</li>" for reason in entry.reasons)
            body = f"{table}<ul class=\"reasons\">{reasons}</ul>"
        blocks.append(f'<details data-version="{e(entry.name)}"{" open" if entry.name in newest else ""}>{head}{body}</details>')
    return "".join(blocks)


def _feedback_html(feedback: FeedbackSummary | None) -> str:
    if feedback is None:
        return "<p>No feedback database yet.</p>"
    e = html.escape
    counts = asdict(feedback.counts)
    order = ("total", "new", "learned", "eval", "trusted_eval", "rejected", "held", "excluded")
    table = (
        "<table><tr>" + "".join(f"<th>{name.replace('_', ' ')}</th>" for name in order) + "</tr><tr>"
        + "".join(f'<td data-field="{name}">{counts[name]}</td>' for name in order) + "</tr></table>"
    )  # fmt: skip
    parts = [
        (
            "<p>Rows as the current lineage sees them: new (not learned yet), learned, eval (trusted: arrived before "
            "the current version was accepted), rejected outputs without a correction, held until a person decides, "
            "excluded for good.</p>"
        ),
        table,
    ]
    for title, groups in (("Held", feedback.held), ("Excluded", feedback.excluded)):
        if not groups:
            parts.append(f"<p>{title}: none.</p>")
            continue
        rows = "".join(
            f'<tr data-state="{group.state}"><td data-field="count">{group.count}</td>'
            f'<td class="text">{e(group.version or "—")}</td><td class="text">{e(group.actor)}</td>'
            f'<td class="text">{e(group.reason)}</td><td class="text">{e(group.since.strftime("%Y-%m-%d %H:%M"))}</td>'
            f'<td class="text"><code>{e(", ".join(group.ids))}{" …" if group.count > len(group.ids) else ""}</code></td></tr>'
            for group in groups
        )
        parts.append(
            f"<h3>{title}</h3><table><tr><th>rows</th><th class=\"text\">version</th><th class=\"text\">by</th>"
            f"<th class=\"text\">reason</th><th class=\"text\">since</th><th class=\"text\">ids</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _waiting_line(report: HistoryReport) -> str:
    since = report.waiting_since.strftime("%Y-%m-%d %H:%M") if report.waiting_since else "?"
    return (
        f"Not sure yet: {_plural(report.waiting, 'row')} wait for more evidence since {since} (the gate could not decide "
        "on them; the next run trains on them with what arrives)."
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


# ---- Markdown (for the Prefect UI) and files -----------------------------------------------------


# The artifact pane shows the newest part of a long history; the page holds all of it.
MARKDOWN_TREE_ROWS = 60
MARKDOWN_TABLE_ROWS = 20


def history_markdown(report: HistoryReport, files: ReportFiles | None = None, chart_png: bytes | None = None) -> str:
    """The report as Markdown for a Prefect artifact: the tree as text, the chart inline (the UI shows a
    data-URL image), the newest versions' data and verdicts, the held and excluded rows, where the files
    are. Text a person typed (reasons, names) is escaped: it cannot add links, images or markup."""
    tree = lineage_tree_lines(report)
    older = len(tree) - MARKDOWN_TREE_ROWS
    lines = [f"# History of `{report.model}`", ""]
    if report.waiting:
        lines += [_waiting_line(report), ""]
    if older > 0:
        tree = [f"… {older} older rows: see the page", *tree[-MARKDOWN_TREE_ROWS:]]
    lines += ["```", *tree, "```", ""]
    if chart_png is not None:
        lines += [f"![history chart](data:image/png;base64,{base64.b64encode(chart_png).decode('ascii')})", ""]
    if report.rollbacks():
        lines += ["Rollbacks:"] + [
            f"- {move.at[:16].replace('T', ' ')}: {move.source or BASE} → {move.target or BASE}"
            + (" (forced)" if move.forced else "") + (f": {_md(move.reason)}" if move.reason else "")
            for move in report.rollbacks()[-MARKDOWN_TABLE_ROWS:]
        ] + [""]  # fmt: skip
    if report.versions:
        lines += ["| version | verdict | new | replay | eval | held | Δ NLL | interval |", "|---|---|---|---|---|---|---|---|"]
        for entry in reversed(report.versions[-MARKDOWN_TABLE_ROWS:]):
            data = entry.data
            counts = (
                f"{data.new} | {data.replay} | {data.eval} | {data.screened + data.held_by_gate}" if data else "— | — | — | —"
            )
            decisive = next((c for c in entry.checks if _charted(c, "target_nll")), None)
            interval = "—" if decisive is None else f"[{decisive['low']:+.4f}, {decisive['high']:+.4f}] {decisive['outcome']}"
            lines.append(
                f"| {_short(entry.name)} | {entry.verdict or 'damaged'} | {counts} | {_signed(entry.row.nll_delta)} | {interval} |"
            )
        lines.append("")
    if report.feedback is not None:
        counts = report.feedback.counts
        lines.append(f"Feedback: {counts.total} rows, {counts.new} new, **{counts.held} held**, {counts.excluded} excluded.")
        for group in (*report.feedback.held, *report.feedback.excluded):
            by = f"{group.version} " if group.version else ""
            lines.append(f"- {group.count} {group.state} ({by}by {_md(group.actor)}): {_md(group.reason)}")
        lines.append("")
    if files is not None:
        lines += [f"Files: `{files.html}` (the page), `{files.png}` (the chart).", ""]
    return "\n".join(lines)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~-])")


def _md(text: str) -> str:
    """A person's text as plain Markdown text: one line, every Markdown and HTML character escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def write_report(report: HistoryReport, out_dir: Path) -> ReportFiles:
    """Write `history.png` and `history.html` (the chart inline) into `out_dir`, each replaced atomically;
    returns their absolute paths (a run's artifact is read far from the run's working folder)."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_chart(report)
    files = ReportFiles(html=out_dir / HTML_FILE, png=out_dir / PNG_FILE)
    _replace(files.png, png)
    _replace(files.html, render_html(report, png).encode("utf-8"))
    return files


def _replace(path: Path, content: bytes) -> None:
    """Readers see the old file or the new one, never half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)
