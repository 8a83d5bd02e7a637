"""Gate quality: clean, new and poisoned feedback batches through the real `retrain` flow.

Setup: the demo's days 1 and 2 (80 rows each) through the real flow with the default run config,
which must leave v2 accepted; and the state `incremental demo` leaves (v4 current). Then, for each
kind and seed, a fresh copy of a state gets one batch and one `retrain` run: from v2 with the default
config (screening, then the gate) and with screening off (the gate alone, every row trained on);
from the demo's v4 with the default config for the kinds users teach. Kinds: honest synthetic
feedback (`clean`), what users teach the model that it finds new (corrections of its own generations,
exact or restyled; a new domain's vocabulary), several raters of whom one poisons a quarter of the
rows, and the six poison kinds (`synthetic.POISON_KINDS`). Reports per kind: accepted, rejected,
inconclusive (rows wait), skipped (everything held by screening), rows held by screening (by rule)
and by the gate, and the trainable rows the next version learned; poisoned rows learned, also when a
poisoned batch is followed by three clean nights; the evaluation stage's wall time with a cold and a
warm parent-score cache; the demo story on `--demo-seeds` seeds. Writes its tables into BENCHMARKS.md
and every trial to benchmarks/results/gate_quality_trials.csv.

    .venv/bin/python benchmarks/gate_quality.py [--seeds 10] [--rows 60] [--correction-rows 24] [--cold 5]
        [--demo-seeds 5] [--sequence-seeds 3] [--kinds clean,corrections,...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
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

from benchmarks.state import learned_by_current, point_at, trainable_train_rows  # noqa: E402

from incremental.config import RunConfig, ScreeningPolicy  # noqa: E402
from incremental.feedback import FeedbackStore  # noqa: E402
from incremental.registry import Registry  # noqa: E402
from incremental.synthetic import (  # noqa: E402
    POISON_KINDS,
    corrected_feedback,
    generate_cases,
    poisoned_feedback,
    synthetic_feedback,
)

MODEL = "tiny"
# Clean batches the model finds new, as users send them: generations of the current version rated
# needs-improvement with the right artifact (exact, or in another valid style), a new domain's
# vocabulary, and several raters of whom one sends a quarter of the rows poisoned.
USER_KINDS = ("corrections", "corrections_restyled", "new_domain", "mixed_raters")
KINDS = ("clean", *USER_KINDS, *POISON_KINDS)
HONEST_RATERS = ("ana", "ben", "chen")
POISONING_RATER = "dee"


def use_state(folder: Path) -> None:
    """Point the settings (read by the flow at each run) at one state folder."""
    point_at(folder, MODEL)


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


GENERATION_TOKENS = 256
_GENERATIONS: dict[tuple[str, int, int], tuple] = {}


def current_generations(folder: Path, seed: int, rows: int) -> tuple[list, list[str], str | None]:
    """Fresh meeting notes and the current version's greedy artifacts for them, computed once per
    (state, seed): both correction kinds and both configs rate the same generations. Batched decoding
    (the gate's `generate_greedy`) instead of one request at a time, for the benchmark's time only."""
    from incremental.scoring import generate_greedy
    from incremental.serving import load_model
    from incremental.settings import Settings

    current = Registry(folder / "finetuned_models", MODEL).current()
    key = (current or "base", seed, rows)
    if key not in _GENERATIONS:
        cases = generate_cases(rows, 7000 + seed)
        loaded = load_model(MODEL, Settings())
        outputs = generate_greedy(
            loaded.model, loaded.tokenizer, [(c.artifact_type, c.notes) for c in cases], max_new_tokens=GENERATION_TOKENS,
            prompt_layout=loaded.prompt_layout,
        )
        _GENERATIONS[key] = (cases, outputs, current)
    return _GENERATIONS[key]


def make_batch(folder: Path, kind: str, seed: int, rows: int) -> tuple[list[str], set[str]]:
    """Add one batch of `kind` to the state in `folder`; returns its ids and the poisoned ones among them."""
    if kind in ("corrections", "corrections_restyled"):
        from incremental.feedback import Generation

        # Fresh notes, generated by the current version and rated by a careful user by generation id.
        cases, outputs, version = current_generations(folder, seed, rows)
        store = FeedbackStore(folder / "feedback.duckdb")
        restyle = seed if kind == "corrections_restyled" else None
        rated = corrected_feedback(cases, outputs, model=MODEL, restyle_seed=restyle)
        ids = []
        for i, (case, output, row) in enumerate(zip(cases, outputs, rated)):
            generation = Generation(
                model=MODEL, version=version, artifact_type=case.artifact_type, notes=case.notes, output=output,
                decoding={"do_sample": False, "max_new_tokens": GENERATION_TOKENS},
            )  # fmt: skip
            store.record_generation(generation)
            ids.append(store.rate(generation.id, row["rating"], correction=row["correction"], rater=HONEST_RATERS[i % 2]))
        return ids, set()
    if kind == "new_domain":
        batch = synthetic_feedback(rows, 6000 + seed, model=MODEL, new_domain=True, source="app")
        return add_rows(folder, [{**row, "rater": HONEST_RATERS[i % 3]} for i, row in enumerate(batch)], f"{kind}-{seed}"), set()
    if kind == "mixed_raters":
        n_bad = rows // 4
        honest = synthetic_feedback(rows - n_bad, 6100 + seed, model=MODEL, source="app")
        bad = poisoned_feedback(n_bad, 6200 + seed, POISON_KINDS[seed % len(POISON_KINDS)], model=MODEL, source="app")
        batch = [{**row, "rater": HONEST_RATERS[i % 3]} for i, row in enumerate(honest)]
        batch += [{**row, "rater": POISONING_RATER} for row in bad]
        ids = add_rows(folder, batch, f"{kind}-{seed}")
        return ids, set(ids[len(honest):])
    batch = synthetic_feedback(rows, 5000 + seed, model=MODEL) if kind == "clean" else poisoned_feedback(rows, 5000 + seed, kind, model=MODEL)
    ids = add_rows(folder, batch, f"{kind}-{seed}")
    return ids, set() if kind == "clean" else set(ids)


def run_trial(
    template: Path, scratch: Path, kind: str, seed: int, rows: int, config: RunConfig, *, cold: bool,
    label: str = "default", start: str = "v2", keep: Path | None = None,
) -> dict:
    from flows.retrain import retrain

    folder = scratch / f"{kind}-{seed}-{label}-{start}-{'cold' if cold else 'warm'}"
    shutil.copytree(template, folder)
    use_state(folder)
    if cold:
        with duckdb.connect(str(folder / "feedback.duckdb")) as con:
            con.execute("DELETE FROM score_cache")
    ids, poisoned = make_batch(folder, kind, seed, rows)
    trainable = trainable_train_rows(folder, ids)
    started = time.perf_counter()
    summary = retrain(model=MODEL, config=config)
    wall = time.perf_counter() - started
    store = FeedbackStore(folder / "feedback.duckdb")
    marks = store.marks(MODEL, ids)
    screened = {m.feedback_id for m in marks if m.actor == "screening" and m.action == "hold"}
    held_by_gate = {m.feedback_id for m in marks if m.actor == "gate" and m.action == "hold"}
    learned = learned_by_current(folder, MODEL) & set(ids)
    rules: dict[str, int] = {}
    for mark in marks:
        if mark.actor == "screening" and mark.action == "hold":
            rule = mark.reason.split(": ", 1)[0]
            rules[rule] = rules.get(rule, 0) + 1
    result = {
        "kind": kind, "seed": seed, "config": label, "start": start, "cache": "cold" if cold else "warm",
        "status": summary.status, "verdict": summary.verdict or "skipped", "rows": len(ids),
        "trainable": len(trainable), "learned": len(learned & trainable),
        "honest_trainable": len(trainable - poisoned), "honest_learned": len((learned & trainable) - poisoned),
        "poisoned": len(poisoned), "poison_learned": len(learned & poisoned),
        "poison_held": len((screened | held_by_gate) & poisoned), "honest_held": len((screened | held_by_gate) - poisoned),
        "screened": len(screened), "held_by_gate": len(held_by_gate), "waiting": summary.n_waiting,
        "rules": ";".join(f"{rule}={count}" for rule, count in sorted(rules.items())),
        "eval_seconds": summary.evaluation.get("wall_seconds"), "screening_seconds": summary.evaluation.get("screening_seconds"),
        "parent_scored": summary.evaluation.get("parent_scored"),
        "parent_cached": summary.evaluation.get("parent_cached"), "run_seconds": round(wall, 1),
        "first_reason": (summary.reasons[0] if summary.reasons else "")[:160],
    }  # fmt: skip
    if summary.version:
        checks = Registry(folder / "finetuned_models", MODEL).get(summary.version).manifest.gate.checks
        for check in checks:
            pooled = check.get("group") is None  # per-type checks are in the manifest too; the tables read the pool
            if pooled and check["slice"] in ("regression", "new") and check["metric"] in ("target_nll", "prompt_gain") and check["high"] is not None:
                result[f"{check['metric']}_{check['slice']}_delta"] = round(check["delta"], 4)
                result[f"{check['metric']}_{check['slice']}_high"] = round(check["high"], 4)
                result[f"{check['metric']}_{check['slice']}_low"] = round(check["low"], 4)
        if keep is not None:  # the per-example evidence, for analysis
            shutil.copy(folder / "finetuned_models" / MODEL / summary.version / "scores.parquet", keep / f"{kind}-{seed}.parquet")
    shutil.rmtree(folder, ignore_errors=True)
    return result


def run_poison_then_clean(template: Path, scratch: Path, kind: str, seed: int, rows: int, config: RunConfig, nights: int = 3) -> dict:
    """A poisoned batch, then `nights` clean nights: rows that wait (undecided verdicts) or are held must
    not slip into a version that becomes current, diluted by the clean rows that follow."""
    from flows.retrain import retrain

    folder = scratch / f"sequence-{kind}-{seed}"
    shutil.copytree(template, folder)
    use_state(folder)
    poison_ids, _ = make_batch(folder, kind, seed, rows)
    statuses, clean_ids = [retrain(model=MODEL, config=config).status], []
    for night in range(nights):
        ids, _ = make_batch(folder, "clean", 100 * seed + night + 50, rows)
        clean_ids += ids
        statuses.append(retrain(model=MODEL, config=config).status)
    learned = learned_by_current(folder, MODEL)
    clean_trainable = trainable_train_rows(folder, clean_ids)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "kind": kind, "seed": seed, "statuses": " / ".join(statuses), "poison_learned": len(learned & set(poison_ids)),
        "poisoned": len(poison_ids), "clean_learned": len(learned & clean_trainable), "clean_trainable": len(clean_trainable),
    }


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
        "| kind | trials | accepted | rejected | inconclusive | skipped (all held by screening) | rows held by screening | "
        "rows held by the gate | trainable rows learned by the next version | poisoned rows learned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        rows = [t for t in trials if t["kind"] == kind]
        if not rows:
            continue
        count = lambda predicate: sum(1 for t in rows if predicate(t))  # noqa: E731
        trainable, learned = sum(t["trainable"] for t in rows), sum(t["learned"] for t in rows)
        lines.append(
            f"| {kind} | {len(rows)} | {count(lambda t: t['status'] == 'accepted')} | {count(lambda t: t['verdict'] == 'reject')} | "
            f"{count(lambda t: t['verdict'] == 'inconclusive')} | {count(lambda t: t['status'] == 'skipped')} | "
            f"{sum(t['screened'] for t in rows)} of {sum(t['rows'] for t in rows)} | {sum(t['held_by_gate'] for t in rows)} | "
            f"{learned} of {trainable} ({100 * learned / max(trainable, 1):.0f} %) | "
            f"{sum(t['poison_learned'] for t in rows)} of {sum(t['poisoned'] for t in rows)} |"
        )
    poison = [t for t in trials if t["kind"] in POISON_KINDS]
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


def users_table(trials: list[dict]) -> list[str]:
    """What users teach: per starting state and clean kind the model finds new, how much the next version learned."""
    lines = [
        "| start | kind | trials | accepted | inconclusive (rows wait) | rejected | skipped | trials with >= 95 % learned | "
        "trainable rows learned | rows held by screening (by rule) | rows held by the gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for start in sorted({t["start"] for t in trials}):
        for kind in ("clean", "corrections", "corrections_restyled", "new_domain"):
            rows = [t for t in trials if t["start"] == start and t["kind"] == kind]
            if not rows:
                continue
            count = lambda predicate: sum(1 for t in rows if predicate(t))  # noqa: E731
            trainable, learned = sum(t["trainable"] for t in rows), sum(t["learned"] for t in rows)
            rules: dict[str, int] = {}
            for t in rows:
                for item in filter(None, t["rules"].split(";")):
                    rule, n = item.rsplit("=", 1)
                    rules[rule] = rules.get(rule, 0) + int(n)
            by_rule = ", ".join(f"{rule} {n}" for rule, n in sorted(rules.items())) or "none"
            lines.append(
                f"| {start} | {kind} | {len(rows)} | {count(lambda t: t['status'] == 'accepted')} | "
                f"{count(lambda t: t['verdict'] == 'inconclusive')} | {count(lambda t: t['verdict'] == 'reject')} | "
                f"{count(lambda t: t['status'] == 'skipped')} | "
                f"{count(lambda t: t['status'] == 'accepted' and t['learned'] >= 0.95 * t['trainable'])} | "
                f"{learned} of {trainable} ({100 * learned / max(trainable, 1):.1f} %) | "
                f"{sum(t['screened'] for t in rows)} of {sum(t['rows'] for t in rows)} "
                f"({100 * sum(t['screened'] for t in rows) / max(sum(t['rows'] for t in rows), 1):.1f} %; {by_rule}) | "
                f"{sum(t['held_by_gate'] for t in rows)} |"
            )
    return lines


def mixed_table(trials: list[dict]) -> list[str]:
    rows = [t for t in trials if t["kind"] == "mixed_raters"]
    if not rows:
        return []
    lines = [
        "| config | trials | accepted | honest raters' trainable rows learned | honest rows held | poisoned rows | "
        "poisoned rows held | poisoned rows learned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in ("default", "no-screening"):
        chosen = [t for t in rows if t["config"] == label and t["cache"] == "warm"]
        if not chosen:
            continue
        total = lambda key: sum(t[key] for t in chosen)  # noqa: E731
        lines.append(
            f"| {label} | {len(chosen)} | {sum(1 for t in chosen if t['status'] == 'accepted')} | "
            f"{total('honest_learned')} of {total('honest_trainable')} ({100 * total('honest_learned') / max(total('honest_trainable'), 1):.0f} %) | "
            f"{total('honest_held')} | {total('poisoned')} | {total('poison_held')} | {total('poison_learned')} |"
        )
    return lines


def sequence_table(sequences: list[dict]) -> list[str]:
    if not sequences:
        return []
    lines = [
        "| poison kind | sequences | runs (poison night, then clean nights) | poisoned rows learned by the current version | clean trainable rows learned |",
        "|---|---|---|---|---|",
    ]
    for kind in POISON_KINDS:
        rows = [t for t in sequences if t["kind"] == kind]
        if not rows:
            continue
        statuses = sorted({t["statuses"] for t in rows})
        lines.append(
            f"| {kind} | {len(rows)} | {'; '.join(statuses)} | {sum(t['poison_learned'] for t in rows)} of "
            f"{sum(t['poisoned'] for t in rows)} | {sum(t['clean_learned'] for t in rows)} of {sum(t['clean_trainable'] for t in rows)} |"
        )
    return lines


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


def build_demo_state(folder: Path) -> str:
    """The state `make demo` leaves (v4 current after a rollback), as a starting point."""
    from rich.console import Console

    from cli.demo import run_demo

    with redirect_stdout(io.StringIO()) as buffer:
        run_demo(folder, Console(file=buffer, width=160), seed=0)
    current = Registry(folder / "finetuned_models", MODEL).current()
    if current is None or not current.startswith("v4_"):
        raise SystemExit(f"demo state: expected v4 current, got {current}")
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--correction-rows", type=int, default=24, help="generations rated per correction batch")
    parser.add_argument("--gate-alone-seeds", type=int, default=10, help="seeds also run with screening off (the gate alone)")
    parser.add_argument("--cold", type=int, default=5, help="clean seeds also run with an emptied parent-score cache")
    parser.add_argument("--demo-seeds", type=int, default=5)
    parser.add_argument("--sequence-seeds", type=int, default=3, help="poisoned batch then three clean nights, per poison kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    parser.add_argument("--part", help="run only, and keep the results as part NAME (for processes run side by side)")
    parser.add_argument("--merge", help="make the tables from the parts NAME,NAME,... instead of running")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    results = ROOT / "benchmarks" / "results"
    if args.merge:
        parts = [json.loads((results / f"gate_quality_part-{name}.json").read_text()) for name in args.merge.split(",")]
        write_tables(args, [t for part in parts for t in part["trials"]], [q for part in parts for q in part["sequences"]],
                     [d for part in parts for d in part["demos"]], max(part["seconds"] for part in parts),
                     [part["command"] for part in parts])  # fmt: skip
        return
    config = RunConfig()
    unscreened = config.model_copy(update={"gate": config.gate.model_copy(update={"screening": ScreeningPolicy(enabled=False)})})
    started = time.perf_counter()
    trials: list[dict] = []
    sequences: list[dict] = []

    def rows_of(kind: str) -> int:
        return args.correction_rows if kind.startswith("corrections") else args.rows

    with tempfile.TemporaryDirectory(prefix="gate-quality-") as scratch_name:
        scratch = Path(scratch_name)
        template = scratch / "template"
        v2 = build_template(template, config)
        print(f"template: {v2} accepted", flush=True)
        demo_state = scratch / "demo-state"
        starts = {"v2 (two clean days)": template}
        if any(kind in kinds for kind in ("corrections", "corrections_restyled", "new_domain")):
            starts["v4 (the demo's end state)"] = demo_state
            print(f"demo state: {build_demo_state(demo_state)} current", flush=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for kind in kinds:
                # The gate alone on the kinds whose gate verdict tells something new: what screening would
                # have caught, and whether honest corrections pass the gate.
                labels = [("default", config)]
                if seed < args.gate_alone_seeds and kind not in ("corrections_restyled", "new_domain"):
                    labels.append(("no-screening", unscreened))
                for label, run_config in labels:
                    trials.append(run_trial(template, scratch, kind, seed, rows_of(kind), run_config, cold=False, label=label, start="v2 (two clean days)"))
                    print(trials[-1], flush=True)
                if kind in ("corrections", "corrections_restyled", "new_domain"):
                    trials.append(
                        run_trial(demo_state, scratch, kind, seed, rows_of(kind), config, cold=False, start="v4 (the demo's end state)")
                    )
                    print(trials[-1], flush=True)
            if "clean" in kinds and seed < args.cold:
                # The cache's effect on the gate alone: the same clean batch, screening off, cache emptied.
                trials.append(run_trial(template, scratch, "clean", seed, args.rows, unscreened, cold=True, label="no-screening", start="v2 (two clean days)"))
                print(trials[-1], flush=True)
        for seed in range(args.sequence_seeds):
            for kind in POISON_KINDS:
                sequences.append(run_poison_then_clean(template, scratch, kind, seed, args.rows, config))
                print(sequences[-1], flush=True)
        demos = run_demo_seeds(scratch, args.demo_seeds)
    results.mkdir(exist_ok=True)
    if args.part:
        document = {"trials": trials, "sequences": sequences, "demos": demos, "seconds": time.perf_counter() - started,
                    "command": " ".join(sys.argv[1:])}  # fmt: skip
        (results / f"gate_quality_part-{args.part}.json").write_text(json.dumps(document, indent=1))
        return
    write_tables(args, trials, sequences, demos, time.perf_counter() - started, [" ".join(sys.argv[1:])])


def write_tables(args, trials: list[dict], sequences: list[dict], demos: list[dict], seconds: float, commands: list[str]) -> None:
    results = ROOT / "benchmarks" / "results"
    fields = sorted({key for t in trials for key in t}, key=lambda k: (k not in trials[0], k))
    with open(results / "gate_quality_trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(trials)
    demo_lines = ["| demo seed | story | runs (v1 / v2 / v3 / v3b / v4) | rows held | seconds |", "|---|---|---|---|---|"]
    demo_lines += [f"| {d['seed']} | {d['story']} | {d['statuses']} | {d['v3_held']} | {d['seconds']} |" for d in demos]
    v2_trials = [t for t in trials if t["start"].startswith("v2")]
    text = "\n".join(
        [
            "## Gate quality: clean, new and poisoned batches through the real flow",
            "",
            "Command: " + " beside ".join(f"`.venv/bin/python benchmarks/gate_quality.py {c}`" for c in commands)
            + (f", then `--merge` of the {len(commands)} parts" if len(commands) > 1 else "") + "  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{seconds:.0f} s in all" + (f" ({len(commands)} processes side by side, INCREMENTAL_THREADS=1 each)" if len(commands) > 1 else "")
            + ". Default run config. Every trial starts from a copy of one "
            f"state and adds one batch: {args.rows} rows, or {args.correction_rows} rated generations for the correction "
            "kinds. Per-trial rows: `benchmarks/results/gate_quality_trials.csv`.",
            "",
            "Kinds: `clean` (honest feedback from the corpus's own distribution), `corrections` (fresh notes, generated by "
            "the current version through `Generator`, rated with the exactly right artifact: needs-improvement with it as "
            "the correction, or good when the generation was already right), `corrections_restyled` (the same, the "
            "correction written in another valid style: field order, indentation, quoting, name case), `new_domain` "
            "(clean rows whose entity, field and domain names the corpus never uses), `mixed_raters` (three honest "
            "raters and one who sends a quarter of the rows poisoned, one poison kind per seed), and the six poison kinds "
            "(every row rated good, wrong in one consistent way). \"Learned\" counts the trainable rows in the train split "
            "(a fifth land in the eval split: never trained) that the version the run made trained on, when it became current.",
            "",
            "**What users teach** (default config): the share of their rows the next version learned, by starting state:",
            "",
            "\n".join(users_table([t for t in trials if t["config"] == "default"])),
            "",
            "**Several raters, one poisoning** (lots are per rater, so the honest raters' rows are judged on their own):",
            "",
            "\n".join(mixed_table(trials)),
            "",
            summarize(v2_trials),
            "",
            f"**A poisoned batch, then three clean nights** ({len({q['seed'] for q in sequences})} seed(s) per poison kind, default config): "
            "rows that wait or are held must not slip into a later version, diluted:",
            "",
            "\n".join(sequence_table(sequences)),
            "",
            f"The demo story (v1, v2 accepted; a swapped batch with screening off rejected by the gate and held; another "
            f"held by screening; rollback; v4 on clean rows only; `incremental demo --seed N`) on {len(demos)} seed(s):",
            "",
            "\n".join(demo_lines),
        ]
    )
    print(text)
    if not args.no_write:
        write_block("gate_quality", text)


if __name__ == "__main__":
    main()
