"""Replay recipe: how much of what the lineage already learned a run trains on beside a batch the model finds new.

Issue 16's gap: a clean batch from a new domain, or corrections written in another valid style, raise the
parent's target NLL on trusted rows by about +0.026 nats/token (margin 0.010), so the gate keeps the
parent. That is forgetting, not noise: the candidate shifts probability towards the new vocabulary or
style (benchmarks/forgetting_by_token.py says which tokens). This benchmark puts the same batches through
the real `retrain` flow under several training recipes, and on the default embedded base or one pretrained
with invented names as well (`--invented-name-share`, a base that has to copy names from the notes), side
by side from the same kind of accepted start (a fresh copy per trial), and reports per recipe and base the
gate's verdicts and its pooled checks on trusted rows (target NLL, artifact validity, content F1), the
rows learned, and the run's wall time (training is most of it). Poison kinds run with screening off
(the gate alone), since more replay also dilutes what a poisoned batch does to trusted rows.

    .venv/bin/python benchmarks/replay_recipe.py [--seeds 4] [--recipes default,ep6,replay4x-ep6]
        [--kinds new_domain,corrections_restyled] [--starts v4] [--invented-name-share 0.5] [--part NAME | --merge A,B]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from benchmarks import gate_quality  # noqa: E402
from benchmarks.report import write_block  # noqa: E402
from benchmarks.state import learned_by_current, trainable_train_rows  # noqa: E402

from incremental.config import NovelBatchRecipe, RunConfig, ScreeningPolicy  # noqa: E402
from incremental.registry import Registry  # noqa: E402
from incremental.synthetic import POISON_KINDS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHECKS = ("target_nll", "artifact_validity", "content_f1")
TITLES = {
    "replay_recipe": "Replay recipe: learning a batch the model finds new without forgetting trusted rows",
    "novel_batch_recipe": "Novel-batch recipe: the default raises replay and epochs only for batches the parent finds new",
}


def recipe(name: str) -> RunConfig:
    """A named recipe. `default` is today's RunConfig: the configured recipe, raised to the novel-batch
    recipe for a batch the parent finds new (incremental/recipe.py). The others are fixed: the novel-batch
    recipe is off, and they change only replay and epochs (`configured` is the default without it)."""
    if name == "default":
        return RunConfig()
    config = RunConfig(novel_batch=NovelBatchRecipe(enabled=False))
    data, train = config.data, config.train
    changes = {
        "configured": {},
        "ep6": {"train": train.model_copy(update={"epochs": 6.0})},
        "replay256": {"data": data.model_copy(update={"min_replay_rows": 256})},
        "replay256-ep6": {
            "data": data.model_copy(update={"min_replay_rows": 256}), "train": train.model_copy(update={"epochs": 6.0})
        },
        "replay4x-ep6": {
            "data": data.model_copy(update={"replay_ratio": 4.0, "min_replay_rows": 256}),
            "train": train.model_copy(update={"epochs": 6.0}),
        },
    }
    if name not in changes:
        raise SystemExit(f"--recipes: unknown recipe {name!r}; expected default or some of {', '.join(changes)}")
    return config.model_copy(update=changes[name])


def run_trial(template: Path, scratch: Path, kind: str, seed: int, name: str, start: str, then_clean: bool = False) -> dict:
    """One batch of `kind` through the real flow from a fresh copy of `template`. With `then_clean`, a batch the
    gate did not reject is followed by an ordinary clean night (60 rows) under the same recipe: rows that waited
    come back with it, and what the lineage learned by then, and whether screening held the clean night, is
    recorded."""
    from flows.retrain import retrain

    config = recipe(name)
    screening = kind not in POISON_KINDS
    if not screening:  # the gate alone: what it lets through when screening misses a poisoned batch
        config = config.model_copy(update={"gate": config.gate.model_copy(update={"screening": ScreeningPolicy(enabled=False)})})
    folder = scratch / f"{kind}-{seed}-{name}-{start}"
    shutil.copytree(template, folder)
    gate_quality.use_state(folder)
    rows = 24 if kind.startswith("corrections") else 60
    ids, poisoned = gate_quality.make_batch(folder, kind, seed, rows)
    trainable = trainable_train_rows(folder, ids)
    started = time.perf_counter()
    summary = retrain(model=gate_quality.MODEL, config=config)
    learned = learned_by_current(folder, gate_quality.MODEL) & trainable
    result = {
        "kind": kind, "seed": seed, "recipe": name, "start": start, "screening": screening,
        "invented_name_share": float(os.environ["INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE"]),
        "verdict": summary.verdict or "skipped", "status": summary.status, "trainable": len(trainable),
        "learned": len(learned - poisoned), "poison_learned": len(learned & poisoned),
        "run_seconds": round(time.perf_counter() - started, 1),
        "first_reason": (summary.reasons[0] if summary.reasons else "")[:200],
    }  # fmt: skip
    result["screened"] = summary.n_screened
    if summary.version:
        manifest = Registry(folder / "finetuned_models", gate_quality.MODEL).get(summary.version).manifest
        result["train_seconds"] = manifest.training.wall_seconds if manifest.training else None
        result["recipe_applied"] = (manifest.data.recipe or "").split(" (")[0]
        for check in manifest.gate.checks:
            if check.get("group") is None and check["slice"] == "regression" and check["metric"] in CHECKS and check["high"] is not None:
                result[check["metric"]] = [round(check[key], 4) for key in ("delta", "low", "high")] + [check["outcome"]]
    if then_clean and result["verdict"] in ("accept", "inconclusive"):
        gate_quality.make_batch(folder, "clean", 7000 + seed, 60)
        night = retrain(model=gate_quality.MODEL, config=config)
        result["next_night"] = {
            "verdict": night.verdict or "skipped", "screened": night.n_screened,
            "learned_by_then": len((learned_by_current(folder, gate_quality.MODEL) & trainable) - poisoned),
        }  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):+.3f}" if values else "-"


def _base(trial: dict) -> str:
    share = trial.get("invented_name_share", 0.0)  # trials run before the option existed used the default base
    return f"{share:.0%} invented names" if share else "corpus names only"


def table(trials: list[dict]) -> list[str]:
    lines = [
        "| kind | start | base pretrained on | recipe | trials | accept / inconclusive / reject / all held by screening | rows learned "
        "| trusted NLL change (median; highest upper end) | validity change (median; shown non-inferior) "
        "| content F1 change (median) | run s (median) | novel-batch recipe applied | then a clean night: accept / inconclusive "
        "/ reject / held; rows learned by then |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(dict.fromkeys(t["recipe"] for t in trials))}  # as run

    def key(t: dict) -> tuple:
        return t["kind"], t["start"], _base(t), t["recipe"]

    for group_key in sorted({key(t) for t in trials}, key=lambda k: (k[0], k[1], k[2] != "corpus names only", order[k[3]])):
        kind, start, base, name = group_key
        group = [t for t in trials if key(t) == group_key]
        verdicts = [t["verdict"] for t in group]
        nll = [t["target_nll"] for t in group if "target_nll" in t]
        validity = [t["artifact_validity"] for t in group if "artifact_validity" in t]
        f1 = [t["content_f1"] for t in group if "content_f1" in t]
        learned = (
            f"{sum(t['learned'] for t in group)} of {sum(t['trainable'] for t in group)}"
            if kind not in POISON_KINDS else f"poison {sum(t['poison_learned'] for t in group)} of {sum(t['trainable'] for t in group)}"
        )  # fmt: skip
        nll_cell = f"{_median([c[0] for c in nll])}; {max(c[2] for c in nll):+.3f}" if nll else "-"
        validity_cell = f"{_median([c[0] for c in validity])}; {sum(c[3] == 'pass' for c in validity)} of {len(validity)}" if validity else "-"
        lines.append(
            f"| {kind}{'' if group[0]['screening'] else ' (gate alone)'} | {start} | {base} | {name} | {len(group)} "
            f"| {verdicts.count('accept')} / {verdicts.count('inconclusive')} / {verdicts.count('reject')} / {verdicts.count('skipped')} "
            f"| {learned} "
            f"| {nll_cell} | {validity_cell} | {_median([c[0] for c in f1])} | {statistics.median(t['run_seconds'] for t in group):.0f} "
            f"| {_applied(group)} | {_next_night(group)} |"
        )
    return lines


def _applied(group: list[dict]) -> str:
    recorded = [t for t in group if "recipe_applied" in t]  # trials run before recipes were fitted recorded none
    return f"{sum(t['recipe_applied'] == 'novel batch' for t in recorded)} of {len(recorded)}" if recorded else "-"


def _next_night(group: list[dict]) -> str:
    nights = [t["next_night"] for t in group if "next_night" in t]
    if not nights:
        return "-"
    verdicts = [n["verdict"] for n in nights]
    held = sum(n["verdict"] == "skipped" for n in nights)
    counts = f"{verdicts.count('accept')} / {verdicts.count('inconclusive')} / {verdicts.count('reject')} / {held}"
    by_then = f"{sum(n['learned_by_then'] for n in nights)} of {sum(t['trainable'] for t in group if 'next_night' in t)}"
    return f"{counts}; {by_then} (clean rows held: {sum(n['screened'] for n in nights)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--recipes", default="default,ep6,replay4x-ep6")
    parser.add_argument("--kinds", default="new_domain,corrections_restyled")
    parser.add_argument("--starts", default="v4", help="v2 (two clean days) and/or v4 (the demo's end state)")
    parser.add_argument(
        "--invented-name-share", type=float, default=0.0,
        help="the embedded base's EmbeddedBaseSpec.invented_name_share (0: the default base, pretrained on the corpus's names only)",
    )
    parser.add_argument("--then-clean", action="store_true", help="follow each batch the gate did not reject with a clean night")
    parser.add_argument("--template", type=Path, help="start from this copy of the demo's end state (v4) instead of building one")
    parser.add_argument(
        "--block", default="replay_recipe",
        help="results name: benchmarks/results/BLOCK_trials.json, part files and the BENCHMARKS.md block",
    )
    parser.add_argument("--part", help="run only, and keep the trials as part NAME (for processes run side by side)")
    parser.add_argument("--merge", help="make the table from the parts NAME,NAME,... instead of running")
    args = parser.parse_args()
    # Which embedded base (read by the flow's settings at each run): the corpus's names only (0), or
    # pretrained with that share of invented names (incremental/embedded.py).
    os.environ["INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE"] = str(args.invented_name_share)
    RESULTS.mkdir(exist_ok=True)
    if args.merge:
        parts = [json.loads((RESULTS / f"{args.block}_part-{name}.json").read_text()) for name in args.merge.split(",")]
        write(args, [t for p in parts for t in p["trials"]], max(p["seconds"] for p in parts), [p["command"] for p in parts])
        return
    started = time.perf_counter()
    trials: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="replay-recipe-") as scratch_name:
        scratch = Path(scratch_name)
        templates = {}
        for start in args.starts.split(","):
            templates[start] = scratch / f"template-{start}"
            if start == "v2":
                gate_quality.build_template(templates[start], RunConfig())
            elif start == "v4" and args.template:
                templates[start] = args.template
            elif start == "v4":
                gate_quality.build_demo_state(templates[start])
            else:
                raise SystemExit(f"--starts: unknown start {start!r}; expected v2 or v4")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for kind in args.kinds.split(","):
                for start, template in templates.items():
                    for name in args.recipes.split(","):
                        trials.append(run_trial(template, scratch, kind, seed, name, start, args.then_clean))
                        print(json.dumps(trials[-1]), flush=True)
    document = {"trials": trials, "seconds": time.perf_counter() - started, "command": " ".join(sys.argv[1:])}
    if args.part:
        (RESULTS / f"{args.block}_part-{args.part}.json").write_text(json.dumps(document, indent=1))
        return
    write(args, trials, document["seconds"], [document["command"]])


def write(args, trials: list[dict], seconds: float, commands: list[str]) -> None:
    (RESULTS / f"{args.block}_trials.json").write_text(json.dumps(trials, indent=1))
    title = TITLES.get(args.block, args.block)
    text = "\n".join([
        f"## {title}",
        "",
        f"`{'`, `'.join('.venv/bin/python benchmarks/replay_recipe.py ' + c for c in commands)}`: "
        f"{platform.machine()}, {os.cpu_count()} cores, {seconds:.0f} s (processes side by side). One fresh copy of the "
        "start per trial; the same batch for every recipe of a seed. Checks are the gate's pooled checks on trusted rows "
        "(candidate minus parent; NLL margin 0.010, validity and F1 margin 0.1). Every trial is in "
        f"benchmarks/results/{args.block}_trials.json.",
        "",
        *table(trials),
    ])  # fmt: skip
    print(text)
    write_block(args.block, text)


if __name__ == "__main__":
    main()
