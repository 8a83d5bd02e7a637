"""Learning curve: what users receive, per artifact type, night after night of feedback, in four arms.

Nights of feedback (`--rows` rows each) go through the real `retrain` flow. Each night 10 % of the rows
come from a careless rater (`careless`): a plausibly wrong output (one entity, field or relation
missing or swapped: the needs-improvement outputs of `synthetic_feedback`) rated good. The rest come
from three honest raters, except on the poisoned night (`--poison-night`), when a rater (`dee`) sends
them all poisoned (`synthetic.poisoned_feedback`, `--poison-kind`), and the new-domain night
(`--new-domain-night`), whose notes use names the corpus never does. Row ids are fixed per night
(`n04-017`), so every arm gets the identical rows and the same train/eval split (a function of the id).

After each night, the current version of each arm generates greedily for fresh meeting notes
(`incremental.quality`: `--fresh-per-type` notes per type from a seed no feedback was drawn from, and
none whose notes equal a feedback row's) and is scored per type: validity (the share that parses as
its type) and content F1 (declared names against the right artifact's); also content F1 on fresh
notes of the new domain, pooled over types. The arms, each in its own state folder (own DuckDB,
own `finetuned_models/`):

- `loop`: this loop, the default RunConfig (screening, then the gate). Held rows stay held: in the
  benchmark nobody releases or excludes anything.
- `nogate`: the same continual training with screening off and a gate that promotes every candidate
  (every gated metric's margin 1e9, `min_eval_examples` 1, inconclusive promotes), so every row is
  trained on and every version becomes current; its greedy samples are off (`generation_rows` 0:
  nothing reads them).
- `scratch`: every night a fresh state folder gets every row of the nights so far and the `nogate`
  config, so Base Mode trains a first version from the base on all trainable rows so far (checked
  against the stored rows each night: `scratch_trained` / `scratch_trainable` in the CSV).
- `base`: the base model alone, scored once.

Compute per run, from the version's manifest (`finetuned_models/<model>/<version>/manifest.json`):
training wall seconds (loading the base and adapter, tokenizing, training, saving), examples in the
train split (new + replay; each seen `train.epochs` times) and target tokens trained (all epochs);
per night and cumulative. A rejected candidate's training counts too; a skipped run trained nothing.
Also the run's wall time (screening, evaluation and the flow included).

Writes every (night, arm) to benchmarks/results/learning_curve.csv (after each night, so a stopped run
keeps what it measured), the chart to benchmarks/results/learning_curve.png, and its tables, with the
issue's targets met or not, into BENCHMARKS.md (`learning_curve` block of `--out-md`).

    INCREMENTAL_THREADS=1 .venv/bin/python benchmarks/learning_curve.py [--nights 10] [--rows 60]
        [--fresh-per-type 20] [--arms loop,nogate,scratch,base] [--poison-night 4] [--new-domain-night 7]
        [--poison-kind swapped] [--out-md BENCHMARKS.md] [--smoke]

`--smoke`: 2 nights of 20 rows, 4 fresh notes per type, poison on night 2 (a check that every arm
runs, minutes; its tables say they come from a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A Prefect home of its own, set before anything imports prefect: two benchmark processes sharing one
# home share one Prefect database, and each run waits for the other's model slot.
_PREFECT_HOME = tempfile.TemporaryDirectory(prefix="learning-curve-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME.name
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


from benchmarks.report import write_block  # noqa: E402
from benchmarks.state import learned_by_current, point_at, trainable_train_rows  # noqa: E402
from incremental.config import RunConfig, ScreeningPolicy  # noqa: E402
from incremental.feedback import FeedbackStore  # noqa: E402
from incremental.gate import METRICS  # noqa: E402
from incremental.prompting import ARTIFACT_TYPES  # noqa: E402
from incremental.quality import TypeQuality, fresh_cases, score_generations  # noqa: E402
from incremental.registry import Registry  # noqa: E402
from incremental.synthetic import POISON_KINDS, MeetingCase, poisoned_feedback, synthetic_feedback  # noqa: E402

MODEL = "tiny"
ARMS = ("loop", "nogate", "scratch", "base")
HONEST_RATERS = ("ana", "ben", "chen")
CARELESS_RATER = "careless"
POISONING_RATER = "dee"
CARELESS_SHARE = 0.1
# Seeds of the feedback streams (plus the night's number) and of the fresh notes: the fresh notes'
# seed is drawn from by nothing else, and notes equal to a feedback row's are dropped besides.
HONEST_SEED, CARELESS_SEED, POISON_SEED, FRESH_SEED = 1000, 2000, 3000, 424_242
MAX_NEW_TOKENS = 256  # the gate's and serving's default generation length
RESULTS = ROOT / "benchmarks" / "results"
CSV_PATH, PNG_PATH = RESULTS / "learning_curve.csv", RESULTS / "learning_curve.png"
# Issue targets: validity per type from this night on, content F1 per type from this night on, and
# the from-scratch comparison.
VALIDITY_TARGET, VALIDITY_BY = 0.9, 3
F1_TARGET, F1_BY = 0.7, 5
SCRATCH_F1_GAP, SCRATCH_COMPUTE_SHARE = 0.05, 1 / 3


def use_state(folder: Path) -> None:
    """Point the settings (read by the flow at each run) at one state folder."""
    point_at(folder, MODEL)


def promote_always(config: RunConfig) -> RunConfig:
    """`config` with screening off and a gate that promotes every candidate: no gated metric can fail
    (margin 1e9), no slice is too small to judge (a first version with too few rows keeps the base
    whatever `first_version_on_inconclusive` says), and an inconclusive verdict promotes."""
    gate = config.gate.model_dump()
    for spec in METRICS:
        gate[spec.name]["margin"] = 1e9
    gate.update(
        min_eval_examples=1, on_inconclusive="promote", first_version_on_inconclusive="promote", new_rows_must_improve=False,
        screening=ScreeningPolicy(enabled=False).model_dump(), generation_rows=0,
    )  # fmt: skip
    # Validated, so that a field this benchmark names and the config no longer has fails here, not mid-run.
    return RunConfig.model_validate({**config.model_dump(), "gate": gate})


@dataclass(frozen=True)
class Night:
    number: int
    kind: str  # clean, poison or new_domain
    rows: tuple[dict, ...]  # with their fixed ids

    def ids_by(self, rater: str) -> set[str]:
        return {row["id"] for row in self.rows if row["rater"] == rater}


def make_night(number: int, n_rows: int, kind: str, poison_kind: str) -> Night:
    n_careless = round(n_rows * CARELESS_SHARE)
    n_main = n_rows - n_careless
    new_domain = kind == "new_domain"
    if kind == "poison":
        main = [{**row, "rater": POISONING_RATER} for row in poisoned_feedback(n_main, POISON_SEED + number, poison_kind, model=MODEL)]
    else:
        honest = synthetic_feedback(n_main, HONEST_SEED + number, model=MODEL, new_domain=new_domain)
        main = [{**row, "rater": HONEST_RATERS[i % len(HONEST_RATERS)]} for i, row in enumerate(honest)]
    # A careless rater approves a plausible artifact without checking it against the notes: the
    # degraded outputs synthetic_feedback gives needs-improvement rows, rated good, no correction.
    degraded = synthetic_feedback(n_careless, CARELESS_SEED + number, model=MODEL, good_share=0.0, corrected_share=0.0, new_domain=new_domain)
    careless = [{**row, "rating": "good", "correction": None, "rater": CARELESS_RATER} for row in degraded]
    rows = [{**row, "id": f"n{number:02d}-{i:03d}"} for i, row in enumerate(main + careless)]
    return Night(number, kind, tuple(rows))


def add_rows(folder: Path, rows: list[dict] | tuple[dict, ...]) -> None:
    store = FeedbackStore(folder / "feedback.duckdb")
    store.init()
    store.add_many(rows)


def short(version: str | None) -> str:
    """`v3_20261125_140000` -> `v3`; the base model -> `base`."""
    return version.split("_", 1)[0] if version else "base"


class Scorer:
    """Greedy generations of a version on the fixed fresh notes, scored per type; each version once
    (greedy decoding is deterministic, so a version that stays current keeps its scores)."""

    def __init__(self, cases: list[MeetingCase], new_domain_cases: list[MeetingCase]) -> None:
        self.cases, self.new_domain_cases = cases, new_domain_cases
        self._done: dict[tuple[str, str], dict[str, float]] = {}

    def score(self, folder: Path, version: str | None) -> dict[str, float]:
        from incremental.scoring import generate_greedy
        from incremental.serving import BASE, load_model
        from incremental.settings import Settings

        key = (str(folder), version) if version else ("", BASE)
        if key not in self._done:
            use_state(folder)
            loaded = load_model(MODEL, Settings(), version=version or BASE)
            cases = self.cases + self.new_domain_cases
            # Batches of 32 rather than the decoder's default 8: about twice as fast on CPU, and a text does
            # not depend on its batch (left padding, masked; tests/integration/test_serving.py checks it).
            prompts = [(c.artifact_type, c.notes) for c in cases]
            texts = generate_greedy(
                loaded.model, loaded.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, prompt_layout=loaded.prompt_layout, batch_size=32
            )
            default = score_generations(self.cases, texts[: len(self.cases)])
            scores = flatten(default, "")
            if self.new_domain_cases:
                scores |= flatten(score_generations(self.new_domain_cases, texts[len(self.cases) :]), "nd_")
            self._done[key] = scores
        return self._done[key]


def flatten(quality: dict[str, TypeQuality], prefix: str) -> dict[str, float]:
    return {f"{prefix}{metric}_{key}": round(getattr(q, attr), 4) for key, q in quality.items()
            for metric, attr in (("validity", "validity"), ("f1", "content_f1"))}  # fmt: skip


def pick_fresh(per_type: int, nights: list[Night], new_domain: bool) -> list[MeetingCase]:
    """`per_type` fresh notes per type whose notes no feedback row has (drawn with spares, then filtered)."""
    if per_type == 0:
        return []
    seen = {row["prompt"] for night in nights for row in night.rows}
    drawn = fresh_cases(3 * per_type, FRESH_SEED + (1 if new_domain else 0), new_domain=new_domain)
    picked: list[MeetingCase] = []
    for artifact_type in ARTIFACT_TYPES:
        unseen = [c for c in drawn if c.artifact_type == artifact_type and c.notes not in seen]
        if len(unseen) < per_type:
            raise SystemExit(f"fresh notes: only {len(unseen)} unseen {artifact_type} notes of {3 * per_type} drawn; lower --fresh-per-type")
        picked += unseen[:per_type]
    return picked


def run_flow(folder: Path, config: RunConfig) -> dict:
    """One `retrain` run on the state in `folder`; its outcome and the trained version's compute."""
    from flows.retrain import retrain

    use_state(folder)
    started = time.perf_counter()
    try:
        summary = retrain(model=MODEL, config=config)
    except Exception as error:  # noqa: BLE001 - a failed run is this night's result for the arm, recorded in the table
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:200], "run_seconds": round(time.perf_counter() - started, 1)}
    record = {
        "status": summary.status, "verdict": summary.verdict or "", "version": summary.version or "",
        "screened": summary.n_screened, "held_by_gate": summary.n_held, "waiting": summary.n_waiting,
        "run_seconds": round(time.perf_counter() - started, 1), "reason": (summary.reasons[0] if summary.reasons else "")[:200],
        "train_seconds": 0.0, "train_examples": 0, "target_tokens": 0, "new_rows": 0, "replay_rows": 0,
    }  # fmt: skip
    if summary.version:  # trained (accepted or rejected): the manifest records what the training cost
        manifest = Registry(folder / "finetuned_models", MODEL).get(summary.version).manifest
        record.update(
            train_seconds=round(manifest.training.wall_seconds, 2), train_examples=manifest.data.n_train_examples,
            target_tokens=manifest.training.target_tokens, new_rows=len(manifest.data.new_ids), replay_rows=len(manifest.data.replay_ids),
        )  # fmt: skip
    return record


def run_scratch(folder: Path, so_far: list[Night], config: RunConfig) -> dict:
    """Every row of `so_far` into a new state in `folder`, one run (Base Mode: a first version), and
    whether that version trained on every trainable train row (`scratch_trained` of `scratch_trainable`)."""
    rows = [row for night in so_far for row in night.rows]
    add_rows(folder, rows)
    run = run_flow(folder, config)
    trained = set(Registry(folder / "finetuned_models", MODEL).get(run["version"]).manifest.data.new_ids) if run.get("version") else set()
    trainable = trainable_train_rows(folder, [row["id"] for row in rows])
    return {**run, "scratch_trained": len(trained & trainable), "scratch_trainable": len(trainable)}


def start_prefect() -> None:
    """One empty flow run, so that the temporary Prefect server a process starts at its first flow run
    (about 25 s on 2 cores) is not counted in the first night's run time."""
    from prefect import flow

    @flow(name="learning-curve-warm-up")
    def warm_up() -> None:
        pass

    warm_up()


def night_kind(number: int, args) -> str:
    return "poison" if number == args.poison_night else "new_domain" if number == args.new_domain_night else "clean"


def write_csv(records: list[dict]) -> None:
    fields = list(dict.fromkeys(key for record in records for key in record))
    with open(CSV_PATH, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--rows", type=int, default=60, help="feedback rows per night (10 %% from the careless rater)")
    parser.add_argument("--fresh-per-type", type=int, default=20, help="fresh notes per artifact type scored each night")
    parser.add_argument("--new-domain-fresh-per-type", type=int, help="fresh new-domain notes per type (default: half of --fresh-per-type)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--poison-night", type=int, default=4)
    parser.add_argument("--poison-kind", default="swapped", choices=POISON_KINDS)
    parser.add_argument("--new-domain-night", type=int, default=7)
    parser.add_argument("--out-md", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave the markdown file alone")
    parser.add_argument("--smoke", action="store_true", help="2 nights of 20 rows, 4 fresh notes per type, poison on night 2")
    args = parser.parse_args()
    if args.smoke:
        args.nights, args.rows, args.fresh_per_type, args.poison_night = 2, 20, 4, 2
    if args.new_domain_fresh_per_type is None:
        args.new_domain_fresh_per_type = max(1, args.fresh_per_type // 2)
    arms = [arm for arm in args.arms.split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")

    started = time.perf_counter()
    nights = [make_night(number, args.rows, night_kind(number, args), args.poison_kind) for number in range(1, args.nights + 1)]
    scorer = Scorer(pick_fresh(args.fresh_per_type, nights, False), pick_fresh(args.new_domain_fresh_per_type, nights, True))
    loop_config = RunConfig()
    nogate_config = promote_always(loop_config)
    RESULTS.mkdir(exist_ok=True)
    start_prefect()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as scratch_name:
        scratch = Path(scratch_name)
        folders = {arm: scratch / arm for arm in ("loop", "nogate", "base")}
        for folder in folders.values():
            folder.mkdir()
        base_scores = scorer.score(folders["base"], None)
        # Night 0: every arm starts as the base model.
        records.append({"night": 0, "batch": "-", "arm": "base", "status": "-", "current": "base", **base_scores})
        previous_scratch: Path | None = None
        for night in nights:
            for arm in arms:
                record = {"night": night.number, "batch": night.kind, "arm": arm}
                if arm == "base":
                    record.update(status="-", current="base", **base_scores)
                    records.append(record)
                    continue
                so_far = nights[: night.number]
                if arm == "scratch":
                    # A new state folder every night: Base Mode trains a first version on every row so far.
                    folder = scratch / f"scratch-night-{night.number:02d}"
                    run = run_scratch(folder, so_far, nogate_config)
                else:
                    folder = folders[arm]
                    add_rows(folder, night.rows)
                    run = run_flow(folder, loop_config if arm == "loop" else nogate_config)
                current = Registry(folder / "finetuned_models", MODEL).current()
                learned = learned_by_current(folder, MODEL)
                careless = {row_id for n in so_far for row_id in n.ids_by(CARELESS_RATER)}
                poisoned = {row_id for n in so_far for row_id in n.ids_by(POISONING_RATER)}
                scoring_started = time.perf_counter()
                scores = scorer.score(folder, current)
                record.update(run, current=short(current), careless_learned=len(learned & careless), poison_learned=len(learned & poisoned),
                              score_seconds=round(time.perf_counter() - scoring_started, 1), **scores)  # fmt: skip
                records.append(record)
                print(f"[learning-curve] night {night.number} ({night.kind}) {arm}: {run['status']}, current {short(current)}, "
                      f"F1 {record['f1_all']:.3f}, validity {record['validity_all']:.3f}, train {run.get('train_seconds', 0)} s", flush=True)  # fmt: skip
                if arm == "scratch":
                    if previous_scratch is not None:
                        shutil.rmtree(previous_scratch, ignore_errors=True)
                    previous_scratch = folder
            write_csv(records)
        # Only trainable rows in the train split can be learned: those of the careless and poisoning raters
        # are the denominators of "learned" (read from a state that holds every night's rows).
        every_row = next((folders[arm] for arm in ("loop", "nogate") if arm in arms), previous_scratch)
        bad = {rater: [row["id"] for night in nights for row in night.rows if row["rater"] == rater] for rater in (CARELESS_RATER, POISONING_RATER)}
        learnable = {rater: len(trainable_train_rows(every_row, ids)) if every_row else 0 for rater, ids in bad.items()}
    seconds = time.perf_counter() - started
    text = report(args, arms, learnable, records, seconds)
    print(text)
    chart(args, arms, records)
    if not args.no_write:
        write_block("learning_curve", text, args.out_md)


def cumulative(records: list[dict], arm: str, key: str) -> dict[int, float]:
    total, out = 0.0, {}
    for record in sorted((r for r in records if r["arm"] == arm and r["night"] > 0), key=lambda r: r["night"]):
        total += record.get(key) or 0
        out[record["night"]] = total
    return out


def targets(args, arms: list[str], records: list[dict]) -> list[str]:
    """The issue's targets, each met or not, with the numbers that decide it."""
    if "loop" not in arms:
        return ["Targets: not judged (the loop arm was not run)."]
    by = {(r["arm"], r["night"]): r for r in records}
    last = args.nights
    nights = range(1, last + 1)
    lines = []

    def from_night(metric: str, threshold: float, start: int) -> str:
        if last < start:
            return f"not judged ({last} nights run, the target is from night {start})"
        misses = [f"night {n} {t} {by[('loop', n)][f'{metric}_{t}']:.2f}" for n in range(start, last + 1) for t in ARTIFACT_TYPES
                  if by[("loop", n)][f"{metric}_{t}"] < threshold]  # fmt: skip
        first = next((n for n in nights if all(by[("loop", m)][f"{metric}_{t}"] >= threshold for m in range(n, last + 1) for t in ARTIFACT_TYPES)), None)
        verdict = "**met**" if not misses else "**not met**"
        reached = f"every type at or above it from night {first} on" if first else "never at or above it on every type to the end"
        return f"{verdict}: {reached}" + (f"; below it: {', '.join(misses[:8])}{' ...' if len(misses) > 8 else ''}" if misses else "")

    lines.append(f"- Validity >= {VALIDITY_TARGET} per type by night {VALIDITY_BY} and after: " + from_night("validity", VALIDITY_TARGET, VALIDITY_BY))
    lines.append(f"- Content F1 >= {F1_TARGET} per type by night {F1_BY} and after: " + from_night("f1", F1_TARGET, F1_BY))

    # A promotion must not lower what users receive: the new current version against the one before it,
    # per type, on the same fresh notes, with the gate's reporting margins for these metrics.
    margins = {"validity": RunConfig().gate.artifact_validity.margin, "f1": RunConfig().gate.content_f1.margin}
    drops, promotions = [], 0
    for n in nights:
        now, before = by[("loop", n)], by[("loop", n - 1)] if n > 1 else by[("base", 0)]
        if now.get("status") != "accepted":
            continue
        promotions += 1
        for metric, margin in margins.items():
            for t in ARTIFACT_TYPES:
                if before[f"{metric}_{t}"] - now[f"{metric}_{t}"] > margin:
                    drops.append(f"night {n} {t} {metric} {before[f'{metric}_{t}']:.2f} -> {now[f'{metric}_{t}']:.2f}")
    lines.append(
        f"- No promotion lowers a type's validity or F1 by more than its margin (validity {margins['validity']}, F1 {margins['f1']}): "
        + ("**met**" if not drops else "**not met**") + f" ({promotions} promotions" + (f"; {'; '.join(drops)})" if drops else ")")
    )
    final = {arm: by[(arm, last)] for arm in arms if (arm, last) in by}
    if "nogate" in final:
        behind = [f"{t} {metric} {final['loop'][f'{metric}_{t}']:.2f} vs {final['nogate'][f'{metric}_{t}']:.2f}"
                  for metric in ("validity", "f1") for t in ARTIFACT_TYPES
                  if final["loop"][f"{metric}_{t}"] < final["nogate"][f"{metric}_{t}"]]  # fmt: skip
        lines.append(f"- The loop ends at or above the no-gate arm on every type (validity and F1, night {last}): "
                     + ("**met**" if not behind else f"**not met** ({'; '.join(behind)})"))  # fmt: skip
    if "scratch" in final:
        gaps = {t: final["scratch"][f"f1_{t}"] - final["loop"][f"f1_{t}"] for t in ARTIFACT_TYPES}
        close = all(gap <= SCRATCH_F1_GAP for gap in gaps.values())
        shares = {}
        for key, label in (("train_seconds", "training seconds"), ("target_tokens", "target tokens")):
            loop_total, scratch_total = cumulative(records, "loop", key)[last], cumulative(records, "scratch", key)[last]
            shares[label] = loop_total / scratch_total if scratch_total else float("nan")
        cheap = all(share <= SCRATCH_COMPUTE_SHARE for share in shares.values())
        lines.append(
            f"- Within {SCRATCH_F1_GAP} F1 of from-scratch on every type (night {last}): " + ("**met**" if close else "**not met**")
            + " (from-scratch minus loop: " + ", ".join(f"{t} {gap:+.2f}" for t, gap in gaps.items()) + f"); using <= 1/3 of its "
            f"training compute: " + ("**met**" if cheap else "**not met**") + " (loop / from-scratch, cumulative: "
            + ", ".join(f"{label} {share:.2f}" for label, share in shares.items()) + ")"
        )  # fmt: skip
    return lines


def report(args, arms: list[str], learnable: dict[str, int], records: list[dict], seconds: float) -> str:
    """The markdown block: per night and arm, compute, totals, the targets. `learnable`: trainable train
    rows per bad rater (careless, poisoning), what "learned" counts out of."""
    fmt = lambda value: "-" if value is None or value == "" else f"{value:.2f}"  # noqa: E731
    header = (
        "| night | batch | arm | run | current | " + " | ".join(f"validity {t}" for t in ARTIFACT_TYPES) + " | "
        + " | ".join(f"F1 {t}" for t in ARTIFACT_TYPES) + " | F1 new domain | rows held (screening / gate) | train s | trained examples |"
    )  # fmt: skip
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        if r["arm"] == "base" and r["night"] > 0:
            continue  # the base does not change: its row at night 0 stands for every night
        held = f"{r['screened']} / {r['held_by_gate']}" if "screened" in r else "-"
        run = r["status"] + (f" ({r['verdict']})" if r.get("verdict") and r["status"] != "accepted" else "")
        lines.append(
            f"| {r['night']} | {r['batch']} | {r['arm']} | {run} | {r['current']} | "
            + " | ".join(fmt(r[f"validity_{t}"]) for t in ARTIFACT_TYPES) + " | " + " | ".join(fmt(r[f"f1_{t}"]) for t in ARTIFACT_TYPES)
            + f" | {fmt(r.get('nd_f1_all'))} | {held} | {fmt(r.get('train_seconds'))} | {r.get('train_examples', '-')} |"
        )  # fmt: skip
    trained_arms = [arm for arm in arms if arm != "base"]
    compute = ["| night | " + " | ".join(f"{arm}: train s (cum.) | {arm}: examples (cum.) | {arm}: target tokens (cum.)" for arm in trained_arms) + " |"]
    compute.append("|---|" + "---|" * (3 * len(trained_arms)))
    cums = {(arm, key): cumulative(records, arm, key) for arm in trained_arms for key in ("train_seconds", "train_examples", "target_tokens")}
    by = {(r["arm"], r["night"]): r for r in records}
    for n in range(1, args.nights + 1):
        cells = []
        for arm in trained_arms:
            r = by.get((arm, n), {})
            cells += [f"{r.get('train_seconds') or 0:.1f} ({cums[(arm, 'train_seconds')].get(n, 0):.1f})",
                      f"{r.get('train_examples') or 0} ({cums[(arm, 'train_examples')].get(n, 0):.0f})",
                      f"{r.get('target_tokens') or 0} ({cums[(arm, 'target_tokens')].get(n, 0):.0f})"]  # fmt: skip
        compute.append(f"| {n} | " + " | ".join(cells) + " |")
    totals = ["| arm | runs trained | training s | run wall s (flow, screening, evaluation included) | careless rows learned | poisoned rows learned | every run accepted |", "|---|---|---|---|---|---|---|"]
    for arm in trained_arms:
        rows = [r for r in records if r["arm"] == arm and r["night"] > 0]
        if not rows:
            continue
        last = rows[-1]
        totals.append(
            f"| {arm} | {sum(1 for r in rows if r.get('train_examples'))} | {sum(r.get('train_seconds') or 0 for r in rows):.1f} | "
            f"{sum(r.get('run_seconds') or 0 for r in rows):.1f} | {last.get('careless_learned', 0)} of {learnable[CARELESS_RATER]} | "
            f"{last.get('poison_learned', 0)} of {learnable[POISONING_RATER]} | {'yes' if all(r['status'] == 'accepted' for r in rows) else 'no'} |"
        )
    scratch_rows = [r for r in records if r["arm"] == "scratch" and r["night"] > 0]
    scratch_note = ""
    if scratch_rows:
        scratch_note = (
            " From-scratch versions trained on " + ", ".join(f"{r.get('scratch_trained', 0)} of {r.get('scratch_trainable', 0)}" for r in scratch_rows)
            + " trainable train rows so far (nights 1, 2, ...)."
        )
    smoke = " **Smoke run** (`--smoke`: too few nights, rows and notes to judge anything; it checks that every arm runs)." if args.smoke else ""
    return "\n".join(
        [
            "## Learning curve: what users receive, night after night, with and without the gate",
            "",
            f"Command: `INCREMENTAL_THREADS={os.environ.get('INCREMENTAL_THREADS', '(unset)')} .venv/bin/python benchmarks/learning_curve.py "
            f"{' '.join(sys.argv[1:])}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {seconds:.0f} s in all.{smoke}",
            "",
            f"{args.nights} nights of {args.rows} feedback rows ({CARELESS_SHARE:.0%} from a careless rater: plausibly wrong artifacts rated "
            f"good); night {args.poison_night}: the rest poisoned (`{args.poison_kind}`, every row rated good); night "
            f"{args.new_domain_night}: a new domain's notes. Every arm gets the identical rows. After each night the arm's current "
            f"version generates greedily for {args.fresh_per_type} fresh notes per type (none a feedback row's) and "
            f"{args.new_domain_fresh_per_type} per type of the new domain. Arms: `loop` (the default RunConfig: screening, then the "
            "gate), `nogate` (screening off, every candidate promoted), `scratch` (every night a first version trained from "
            "the base on every row so far, screening off, promoted), `base` (the base model alone). Chart: "
            "`benchmarks/results/learning_curve.png`; every row: `benchmarks/results/learning_curve.csv`.",
            "",
            "![learning curve](benchmarks/results/learning_curve.png)",
            "",
            "\n".join(lines),
            "",
            "Training compute per night and cumulative (from each version's manifest: training wall seconds; examples in its train "
            "split, each seen `train.epochs` times; target tokens trained over all epochs):",
            "",
            "\n".join(compute),
            "",
            "\n".join(totals),
            "",
            "\"Learned\": rows the arm's final current version (its lineage) trained on, of the rater's trainable rows in the train "
            "split (a fifth of the ids land in the eval split: never trained)." + scratch_note,
            "",
            "**The issue's targets** (loop arm, fresh notes):",
            "",
            "\n".join(targets(args, arms, records)),
        ]
    )


def chart(args, arms: list[str], records: list[dict]) -> None:
    """Validity and F1 per type (columns) against the night, one line per arm; the special nights marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*ARTIFACT_TYPES, "new domain"]
    # Arms often coincide (every arm is the base at first, a rejected night keeps a version): distinct
    # line styles and widths keep each visible under the others.
    styles = {"loop": dict(linewidth=2.5, marker="o"), "nogate": dict(linewidth=1.5, marker="s", linestyle="--"),
              "scratch": dict(linewidth=1.5, marker="^", linestyle="-."), "base": dict(linewidth=1, color="grey", linestyle=":")}  # fmt: skip
    figure, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 7), sharex=True, sharey=True)
    base = next(r for r in records if r["arm"] == "base" and r["night"] == 0)
    for row, metric in enumerate(("validity", "f1")):
        for column, key in enumerate(keys):
            axis = axes[row][column]
            field = f"nd_{metric}_all" if key == "new domain" else f"{metric}_{key}"
            for arm in arms:
                points = [(0, base[field])] + [(r["night"], r[field]) for r in records if r["arm"] == arm and r["night"] > 0]
                axis.plot([p[0] for p in points], [p[1] for p in points], markersize=4, label=arm, **styles[arm])
            for night, label in ((args.poison_night, "poison"), (args.new_domain_night, "new domain")):
                if night <= args.nights:
                    axis.axvline(night, color="grey", linestyle=":", linewidth=1)
                    axis.text(night, 0.02, label, rotation=90, fontsize=7, color="grey")
            if key != "new domain":  # the targets are per type on the corpus's own domain
                axis.axhline(VALIDITY_TARGET if metric == "validity" else F1_TARGET, color="black", linestyle="--", linewidth=0.6)
            where = "new domain, all types" if key == "new domain" else key
            axis.set_title(f"{'validity' if metric == 'validity' else 'content F1'}: {where}", fontsize=10)
            axis.set_xticks(range(0, args.nights + 1))
            axis.set_ylim(0, 1.02)
            axis.grid(alpha=0.3)
            if row == 1:
                axis.set_xlabel("night")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Fresh notes, current version after each night ({'smoke run' if args.smoke else f'{args.rows} rows a night'})")
    figure.tight_layout()
    figure.savefig(PNG_PATH, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
