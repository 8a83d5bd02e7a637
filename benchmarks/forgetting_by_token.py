"""Forgetting by token: which target tokens of trusted rows a candidate got worse at, after a batch the model finds new.

The gate's pooled target NLL on trusted rows is a mean over every target token. A new domain, or
corrections in another valid style, raise it beyond the margin (issue 16). This benchmark says which
tokens carry that rise: names the artifact copies from its notes, the artifact format's own words
(`openapi`, `properties`, `string`, `erDiagram`, ...), or punctuation and layout. It puts one batch per
kind through the real `retrain` flow from the demo's end state, once per training recipe
(benchmarks/replay_recipe.py names them), then scores parent and candidate token by token on the
candidate's trusted eval rows (its eval rows minus those that arrived with the batch), through the
project's own encoding (`dataset.encode_examples`).

    .venv/bin/python benchmarks/forgetting_by_token.py [--kinds new_domain,corrections_restyled]
        [--recipes default,replay4x-ep6] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import duckdb  # noqa: E402
import torch  # noqa: E402

from benchmarks import gate_quality  # noqa: E402
from benchmarks.replay_recipe import recipe  # noqa: E402
from benchmarks.report import write_block  # noqa: E402

from incremental.dataset import IGNORE_INDEX, encode_examples  # noqa: E402
from incremental.registry import Registry  # noqa: E402

CATEGORIES = ("names from the notes", "format words", "punctuation and layout", "end of text")


def trusted_rows(folder: Path, version: str, batch_ids: set[str]) -> list[tuple[str, str, str]]:
    """(type, notes, reference target) of the version's eval rows that did not arrive with the batch."""
    data = Registry(folder / "finetuned_models", gate_quality.MODEL).get(version).manifest.data
    wanted = [row_id for row_id in data.eval_ids if row_id not in batch_ids and row_id not in set(data.arrived_with_batch_ids)]
    with duckdb.connect(str(folder / "feedback.duckdb"), read_only=True) as con:
        return con.execute(
            "SELECT artifact_type, prompt, coalesce(correction, output) FROM feedback WHERE id IN (SELECT unnest(?::VARCHAR[])) "
            "AND (rating = 'good' OR correction IS NOT NULL) ORDER BY id",
            [wanted],
        ).fetchall()


def categorize(notes: str, target: str, pieces: list[str]) -> list[str]:
    """The category of each target token (`pieces`, decoded one by one, in order), from the word it sits in."""
    words_in_notes = {w.lower() for w in re.findall(r"[A-Za-z]+", notes)}
    words_in_notes |= {w[:-1] for w in words_in_notes if w.endswith("s")}  # plurals in the notes, singulars in the artifact
    categories, position = [], 0
    for piece in pieces:
        if piece == "":
            categories.append("end of text")
            continue
        start = target.find(piece, position)
        if start < 0:  # a piece that is not a substring (a split multi-byte character): layout
            categories.append("punctuation and layout")
            continue
        end = position = start + len(piece)
        while start > 0 and target[start - 1].isalpha():
            start -= 1
        while end < len(target) and target[end].isalpha():
            end += 1
        word = target[start:end].lower()
        if not re.search(r"[a-z]", word):
            categories.append("punctuation and layout")
        elif word in words_in_notes or word.rstrip("s") in words_in_notes:
            categories.append("names from the notes")
        else:
            categories.append("format words")
    return categories


def token_nlls(loaded, rows: list[tuple[str, str, str]]) -> list[tuple[list[str], list[float]]]:
    """Per target token (eos included): its decoded text ('' for eos) and its NLL under `loaded`."""
    tasks, notes, targets = zip(*rows)
    examples = encode_examples(loaded.tokenizer, tasks, notes, targets, 512, prompt_layout=loaded.prompt_layout)
    out = []
    with torch.inference_mode():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = loaded.model(input_ids=ids).logits[0, :-1].float()
            labels = torch.tensor(example.labels[1:])
            keep = labels != IGNORE_INDEX
            nll = -torch.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None])[:, 0]
            pieces = [
                "" if token == loaded.tokenizer.eos_token_id else loaded.tokenizer.decode([token]) for token in labels[keep].tolist()
            ]
            out.append((pieces, nll.tolist()))
    return out


def breakdown(folder: Path, parent: str, candidate: str, batch_ids: set[str]) -> dict:
    from incremental.serving import load_model

    rows = trusted_rows(folder, candidate, batch_ids)
    parent_scores = token_nlls(load_model(gate_quality.MODEL, version=parent), rows)
    candidate_scores = token_nlls(load_model(gate_quality.MODEL, version=candidate), rows)
    sums = {c: [0, 0.0, 0.0] for c in CATEGORIES}  # tokens, parent NLL, candidate NLL
    for (_, row_notes, target), (pieces, before), (_, after) in zip(rows, parent_scores, candidate_scores):
        for category, a, b in zip(categorize(row_notes, target, pieces), before, after):
            sums[category][0] += 1
            sums[category][1] += a
            sums[category][2] += b
    total = sum(n for n, _, _ in sums.values())
    return {"rows": len(rows), "tokens": total, "sums": sums}


def run(template: Path, scratch: Path, kind: str, seed: int, name: str) -> dict:
    from flows.retrain import retrain

    folder = scratch / f"{kind}-{name}"
    shutil.copytree(template, folder)
    gate_quality.use_state(folder)
    parent = Registry(folder / "finetuned_models", gate_quality.MODEL).current()
    ids, _ = gate_quality.make_batch(folder, kind, seed, 24 if kind.startswith("corrections") else 60)
    summary = retrain(model=gate_quality.MODEL, config=recipe(name))
    result = {"kind": kind, "recipe": name, "verdict": summary.verdict, **breakdown(folder, parent, summary.version, set(ids))}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def table(results: list[dict]) -> list[str]:
    lines = [
        "| batch | recipe | verdict | trusted rows | change in mean target NLL | " + " | ".join(CATEGORIES) + " |",
        "|---|---|---|---|---|" + "---|" * len(CATEGORIES),
    ]
    for r in results:
        total = r["tokens"]
        change = sum(b - a for _, a, b in r["sums"].values()) / total
        cells = []
        for category in CATEGORIES:
            n, a, b = r["sums"][category]
            cells.append(f"{n / total:.0%} of tokens: {a / n:.3f} -> {b / n:.3f}, adds {(b - a) / total:+.4f}" if n else "-")
        lines.append(f"| {r['kind']} | {r['recipe']} | {r['verdict']} | {r['rows']} | {change:+.4f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="new_domain,corrections_restyled")
    parser.add_argument("--recipes", default="default,replay4x-ep6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="forgetting-") as scratch_name:
        scratch = Path(scratch_name)
        template = scratch / "demo-state"
        gate_quality.build_demo_state(template)
        for kind in args.kinds.split(","):
            for name in args.recipes.split(","):
                results.append(run(template, scratch, kind, args.seed, name))
                print(results[-1], flush=True)
    text = "\n".join([
        "## Forgetting by token: what a batch the model finds new costs trusted rows, token by token",
        "",
        f"`.venv/bin/python benchmarks/forgetting_by_token.py {' '.join(sys.argv[1:])}`: {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.perf_counter() - started:.0f} s. From the demo's end state (v4), one batch "
        f"per kind (seed {args.seed}) through the real flow per recipe; parent and candidate scored token by token on "
        "the candidate's trusted eval rows. A cell: share of target tokens, parent -> candidate mean NLL per token "
        "(nats), and what the category adds to the change in the mean over all tokens (the columns add up to it). "
        "Names from the notes: tokens of a word that also appears in the row's notes (a plural forgiven).",
        "",
        *table(results),
    ])  # fmt: skip
    print(text)
    if not args.no_write:
        write_block("forgetting_by_token", text)


if __name__ == "__main__":
    main()
