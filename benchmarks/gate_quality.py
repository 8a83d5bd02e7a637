"""Gate quality: clean and poisoned feedback batches through the real `retrain` flow, from an accepted v2.

Setup: the demo's days 1 and 2 (80 rows each, seed 0) through the real flow with the default run
config, which must leave v2 accepted. Then, for each kind and seed, a fresh copy of that state gets
one batch of `--rows` rows and one `retrain` run, twice: with the default config (screening, then
the gate) and with screening off (the gate alone, every row trained on). Clean batches are honest
synthetic feedback (good, corrected and rejected ratings); each poison kind rates every row "good"
while its outputs are wrong in one consistent way (see `synthetic.POISON_KINDS`). Reports per kind:
accepted, rejected, inconclusive, skipped (everything held by screening), rows held by screening and
by the gate; the false-accept rate (poison promoted) and false-reject rate (clean refused); the
evaluation stage's wall time with a cold parent-score cache (emptied) and a warm one (as the flow
leaves it) on the same clean batches. Then the demo story on `--demo-seeds` seeds. Writes its tables
into BENCHMARKS.md and every trial to benchmarks/results/gate_quality_trials.csv.

    .venv/bin/python benchmarks/gate_quality.py [--seeds 10] [--rows 60] [--cold 5] [--demo-seeds 5]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_block  # noqa: E402
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import duckdb  # noqa: E402

from incremental.config import RunConfig, ScreeningPolicy  # noqa: E402
from incremental.feedback import FeedbackStore  # noqa: E402
from incremental.registry import Registry  # noqa: E402
from incremental.synthetic import POISON_KINDS, poisoned_feedback, synthetic_feedback  # noqa: E402

MODEL = "tiny"
KINDS = ("clean", *POISON_KINDS)


def use_state(folder: Path) -> None:
    """Point the settings (read by the flow at each run) at one state folder."""
    os.environ["INCREMENTAL_DB_PATH"] = str(folder / "feedback.duckdb")
    os.environ["INCREMENTAL_MODELS_ROOT"] = str(folder / "finetuned_models")
    os.environ["INCREMENTAL_MODEL"] = MODEL
    os.environ["INCREMENTAL_BASE_MODEL"] = "embedded"


def add_rows(folder: Path, rows: list[dict], prefix: str) -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(len(rows))]
    FeedbackStore(folder / "feedback.duckdb").add_many([{**row, "id": row_id} for row, row_id in zip(rows, ids)])
    return ids


def build_template(folder: Path, config: RunConfig) -> str:
    from flows.retrain import retrain

    use_state(folder)
    FeedbackStore(folder / "feedback.duckdb").init()
    summaries = []
    for rows, seed in ((80, 101), (80, 202)):  # the demo's days 1 and 2
        add_rows(folder, synthetic_feedback(rows, seed, model=MODEL), f"demo-{seed}")
        summaries.append(retrain(model=MODEL, config=config))
    v2 = summaries[-1]
    if v2.status != "accepted" or summaries[0].status != "accepted":
        raise SystemExit(f"setup failed: v1 {summaries[0].status}, v2 {v2.status}: {v2.reasons[:1]}")
    return v2.version


def run_trial(
    template: Path, scratch: Path, kind: str, seed: int, rows: int, config: RunConfig, *, cold: bool,
    label: str = "default", keep: Path | None = None,
) -> dict:
    from flows.retrain import retrain

    folder = scratch / f"{kind}-{seed}-{label}-{'cold' if cold else 'warm'}"
    shutil.copytree(template, folder)
    use_state(folder)
    if cold:
        with duckdb.connect(str(folder / "feedback.duckdb")) as con:
            con.execute("DELETE FROM score_cache")
    batch = synthetic_feedback(rows, 5000 + seed, model=MODEL) if kind == "clean" else poisoned_feedback(rows, 5000 + seed, kind, model=MODEL)
    ids = add_rows(folder, batch, f"{kind}-{seed}")
    started = time.perf_counter()
    summary = retrain(model=MODEL, config=config)
    wall = time.perf_counter() - started
    store = FeedbackStore(folder / "feedback.duckdb")
    marks = store.marks(MODEL, ids)
    screened = {m.feedback_id for m in marks if m.actor == "screening" and m.action == "hold"}
    held_by_gate = {m.feedback_id for m in marks if m.actor == "gate" and m.action == "hold"}
    trainable = sum(1 for row in batch if row["rating"] == "good" or row["correction"])
    result = {
        "kind": kind, "seed": seed, "config": label, "cache": "cold" if cold else "warm", "status": summary.status,
        "verdict": summary.verdict or "skipped", "rows": rows, "trainable": trainable,
        "screened": len(screened), "held_by_gate": len(held_by_gate),
        "eval_seconds": summary.evaluation.get("wall_seconds"), "screening_seconds": summary.evaluation.get("screening_seconds"),
        "parent_scored": summary.evaluation.get("parent_scored"),
        "parent_cached": summary.evaluation.get("parent_cached"), "run_seconds": round(wall, 1),
        "first_reason": (summary.reasons[0] if summary.reasons else "")[:160],
    }  # fmt: skip
    if summary.version:
        checks = Registry(folder / "finetuned_models", MODEL).get(summary.version).manifest.gate.checks
        for check in checks:
            if check["slice"] in ("regression", "new") and check["metric"] in ("target_nll", "prompt_gain") and check["delta"] is not None:
                result[f"{check['metric']}_{check['slice']}_delta"] = round(check["delta"], 4)
                result[f"{check['metric']}_{check['slice']}_high"] = round(check["high"], 4)
                result[f"{check['metric']}_{check['slice']}_low"] = round(check["low"], 4)
        if keep is not None:  # the per-example evidence, for analysis
            shutil.copy(folder / "finetuned_models" / MODEL / summary.version / "scores.parquet", keep / f"{kind}-{seed}.parquet")
    shutil.rmtree(folder, ignore_errors=True)
    return result


def run_demo_seeds(scratch: Path, seeds: int) -> list[dict]:
    from rich.console import Console

    from cli.demo import run_demo

    results = []
    for seed in range(seeds):
        workdir = scratch / f"demo-{seed}"
        buffer = io.StringIO()
        started = time.perf_counter()
        try:
            with redirect_stdout(buffer):
                summaries = run_demo(workdir, Console(file=buffer, width=160), seed=seed)
            held = [m for m in FeedbackStore(workdir / "feedback.duckdb").marks(MODEL) if m.action == "hold"]
            results.append({"seed": seed, "story": "as told", "statuses": " / ".join(s.status for s in summaries),
                            "v3_held": len(held), "seconds": round(time.perf_counter() - started)})  # fmt: skip
        except SystemExit:
            tail = buffer.getvalue().strip().splitlines()[-1:]
            results.append({"seed": seed, "story": "broken", "statuses": tail[0][:120] if tail else "?", "v3_held": 0,
                            "seconds": round(time.perf_counter() - started)})  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def outcome_table(trials: list[dict], title: str) -> list[str]:
    lines = [
        title,
        "",
        "| kind | trials | accepted | rejected | inconclusive | skipped (all held by screening) | rows held by screening | rows held by the gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        rows = [t for t in trials if t["kind"] == kind]
        count = lambda predicate: sum(1 for t in rows if predicate(t))  # noqa: E731
        lines.append(
            f"| {kind} | {len(rows)} | {count(lambda t: t['status'] == 'accepted')} | {count(lambda t: t['verdict'] == 'reject')} | "
            f"{count(lambda t: t['verdict'] == 'inconclusive')} | {count(lambda t: t['status'] == 'skipped')} | "
            f"{sum(t['screened'] for t in rows)} of {sum(t['rows'] for t in rows)} | {sum(t['held_by_gate'] for t in rows)} |"
        )
    poison = [t for t in trials if t["kind"] != "clean"]
    clean = [t for t in trials if t["kind"] == "clean"]
    false_accepts = sum(1 for t in poison if t["status"] == "accepted")
    false_rejects = sum(1 for t in clean if t["status"] != "accepted")
    return lines + [
        "",
        f"False accepts (poison promoted): **{false_accepts} of {len(poison)}** poisoned trials "
        f"({100 * false_accepts / max(len(poison), 1):.0f} %; target 0).  ",
        f"False rejects (clean refused: rejected, inconclusive or skipped): **{false_rejects} of {len(clean)}** clean trials "
        f"({100 * false_rejects / max(len(clean), 1):.0f} %; target at most 10 %).",
        "",
    ]


def summarize(trials: list[dict]) -> str:
    clean = [t for t in trials if t["config"] == "default" and t["kind"] == "clean"]
    lines = outcome_table(
        [t for t in trials if t["config"] == "default"],
        "**The default run config** (screening, then the gate). Rows held by screening count train rows and the "
        "eval rows that arrived with them:",
    )
    lines += outcome_table(
        [t for t in trials if t["config"] == "no-screening" and t["cache"] == "warm"],
        "**The gate alone** (`gate.screening.enabled = false`, same batches): what the trusted-row rules catch when "
        "every row is trained on:",
    )
    gate_only = [t for t in trials if t["config"] == "no-screening" and t["kind"] == "clean"]
    cold = {t["seed"]: t for t in gate_only if t["cache"] == "cold"}
    pairs = [(cold[t["seed"]], t) for t in gate_only if t["cache"] == "warm" and t["seed"] in cold and t["eval_seconds"]]
    if pairs:
        ratio = statistics.median(w["eval_seconds"] / c["eval_seconds"] for c, w in pairs)
        lines += [
            "",
            "Gate cost: the evaluation stage (load the base with both adapters, score candidate and parent per example, "
            "generate the greedy samples) on the same clean batches with screening off, so that the parent's scores "
            "come from the cache as the flow leaves it (warm) or are all computed (cold: cache emptied):",
            "",
            "| parent-score cache | trials | median evaluation s | median parent scores computed | median from cache |",
            "|---|---|---|---|---|",
        ]
        for label, side in (("cold", [c for c, _ in pairs]), ("warm", [w for _, w in pairs])):
            lines.append(
                f"| {label} | {len(side)} | {statistics.median(t['eval_seconds'] for t in side):.2f} | "
                f"{statistics.median(t['parent_scored'] for t in side):.0f} | {statistics.median(t['parent_cached'] for t in side):.0f} |"
            )
        lines.append(f"\nWarm / cold evaluation time, median of per-trial ratios: **{ratio:.2f}** (target at most 0.60).")
    screened = [t for t in clean if t["screening_seconds"]]
    if screened:
        lines.append(
            f"Screening (default config, warm cache) took a median {statistics.median(t['screening_seconds'] for t in screened):.2f} s "
            f"per clean batch of {screened[0]['rows']} rows, beside {statistics.median(t['eval_seconds'] for t in screened):.2f} s of evaluation."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--cold", type=int, default=5, help="clean seeds also run with an emptied parent-score cache")
    parser.add_argument("--demo-seeds", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    config = RunConfig()
    unscreened = config.model_copy(update={"gate": config.gate.model_copy(update={"screening": ScreeningPolicy(enabled=False)})})
    started = time.perf_counter()
    trials: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gate-quality-") as scratch_name:
        scratch = Path(scratch_name)
        template = scratch / "template"
        v2 = build_template(template, config)
        print(f"template: {v2} accepted", flush=True)
        for seed in range(args.seeds):
            for kind in kinds:
                for label, run_config in (("default", config), ("no-screening", unscreened)):
                    trials.append(run_trial(template, scratch, kind, seed, args.rows, run_config, cold=False, label=label))
                    print(trials[-1], flush=True)
            if "clean" in kinds and seed < args.cold:
                # The cache's effect on the gate alone: the same clean batch, screening off, cache emptied.
                trials.append(run_trial(template, scratch, "clean", seed, args.rows, unscreened, cold=True, label="no-screening"))
                print(trials[-1], flush=True)
        demos = run_demo_seeds(scratch, args.demo_seeds)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    fields = sorted({key for t in trials for key in t}, key=lambda k: (k not in trials[0], k))
    with open(results / "gate_quality_trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(trials)
    demo_lines = ["| demo seed | story | runs (v1 / v2 / v3 / v3b / v4) | rows held | seconds |", "|---|---|---|---|---|"]
    demo_lines += [f"| {d['seed']} | {d['story']} | {d['statuses']} | {d['v3_held']} | {d['seconds']} |" for d in demos]
    text = "\n".join(
        [
            "## Gate quality: clean and poisoned batches through the real flow",
            "",
            f"Command: `.venv/bin/python benchmarks/gate_quality.py --seeds {args.seeds} --rows {args.rows} --cold {args.cold} "
            f"--demo-seeds {args.demo_seeds}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{time.perf_counter() - started:.0f} s in all. Default run config; every trial starts from the same "
            f"accepted v2 (the demo's days 1 and 2) and adds one batch of {args.rows} rows. Per-trial rows: "
            "`benchmarks/results/gate_quality_trials.csv`.",
            "",
            summarize(trials),
            "",
            f"The demo story (v1, v2 accepted; a swapped batch with screening off rejected by the gate and held; another "
            f"held by screening; rollback; v4 on clean rows only; `incremental demo --seed N`) on {args.demo_seeds} seeds:",
            "",
            "\n".join(demo_lines),
        ]
    )
    print(text)
    if not args.no_write:
        write_block("gate_quality", text)


if __name__ == "__main__":
    main()
