"""Score a candidate adapter and its parent on the same eval snapshot, per example.

Per-example target NLL (token-weighted) and prompt gain are aggregated through the `evaluate`
metric modules shipped in `incremental/metrics/` and loaded by path, so a nightly job never
depends on a hub. Knows nothing about the gate's thresholds: it produces `EvalScores`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import evaluate
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from peft import PeftModel

from incremental.dataset import IGNORE_INDEX, DatasetSnapshot, encode_examples
from incremental.gate import EvalScores
from incremental.modeling import Hardware, ResolvedBase, load_base, load_tokenizer

METRICS_DIR = Path(__file__).parent / "metrics"


@cache
def load_metric(name: str):
    """A metric module shipped with the project (`incremental/metrics/<name>/<name>.py`)."""
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


@dataclass(frozen=True)
class NllScores:
    """Per example: summed target NLL and scored target tokens."""

    nll_sum: np.ndarray
    n_tokens: np.ndarray


def score_nll(model, tokenizer, tasks, notes, targets, *, max_length: int, batch_size: int = 16) -> NllScores:
    """Summed NLL of each target given its prompt, one forward pass per length-sorted batch."""
    examples = encode_examples(tokenizer, tasks, notes, targets, max_length)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    nll_sum = np.zeros(len(examples))
    n_tokens = np.zeros(len(examples), dtype=np.int64)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(e.input_ids) for e in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                length = len(example.input_ids)
                input_ids[row, :length] = torch.tensor(example.input_ids)
                labels[row, :length] = torch.tensor(example.labels)
                attention[row, :length] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            shifted_labels = labels[:, 1:].to(device)
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            mask = shifted_labels != IGNORE_INDEX
            for row, index in enumerate(order[start : start + batch_size]):
                nll_sum[index] = float(token_nll[row][mask[row]].sum())
                n_tokens[index] = int(mask[row].sum())
    return NllScores(nll_sum=nll_sum, n_tokens=n_tokens)


def score_snapshot(model, tokenizer, eval_table: pa.Table, snapshot_hash: str, *, max_length: int) -> EvalScores:
    """target_nll and prompt_gain on the held-out slice, rejected_nll (informational) on the rejected one."""
    held_out = eval_table.filter(pc.equal(eval_table.column("slice"), "eval"))
    rejected = eval_table.filter(pc.equal(eval_table.column("slice"), "rejected"))
    metrics: dict[str, float | None] = {"target_nll": None, "prompt_gain": None, "rejected_nll": None}
    if held_out.num_rows:
        tasks = held_out.column("artifact_type").to_pylist()
        notes = held_out.column("prompt").to_pylist()
        targets = held_out.column("target").to_pylist()
        own = score_nll(model, tokenizer, tasks, notes, targets, max_length=max_length)
        metrics["target_nll"] = _as_float(
            load_metric("target_nll").compute(nll_sum=own.nll_sum.tolist(), n_tokens=own.n_tokens.tolist())["target_nll"]
        )
        if held_out.num_rows >= 2:
            # Each target under the next example's notes (same task header): what the notes are worth.
            other_notes = notes[1:] + notes[:1]
            other = score_nll(model, tokenizer, tasks, other_notes, targets, max_length=max_length)
            metrics["prompt_gain"] = _as_float(
                load_metric("prompt_gain").compute(
                    own_nll_sum=own.nll_sum.tolist(),
                    own_tokens=own.n_tokens.tolist(),
                    other_nll_sum=other.nll_sum.tolist(),
                    other_tokens=other.n_tokens.tolist(),
                )["prompt_gain"]
            )
    if rejected.num_rows:
        scores = score_nll(
            model,
            tokenizer,
            rejected.column("artifact_type").to_pylist(),
            rejected.column("prompt").to_pylist(),
            rejected.column("target").to_pylist(),
            max_length=max_length,
        )
        metrics["rejected_nll"] = _as_float(
            load_metric("target_nll").compute(nll_sum=scores.nll_sum.tolist(), n_tokens=scores.n_tokens.tolist())["target_nll"]
        )
    return EvalScores(snapshot_hash=snapshot_hash, n_examples=held_out.num_rows, metrics=metrics)


def evaluate_pair(
    base: ResolvedBase,
    hardware: Hardware,
    candidate_adapter: Path,
    parent_adapter: Path | None,
    snapshot: DatasetSnapshot,
    *,
    max_length: int,
) -> tuple[EvalScores, EvalScores]:
    """Candidate and parent scored on one loaded base, on the identical snapshot.

    The parent is another named adapter on the same base, or the bare base (adapter disabled)
    when the candidate is the first version.
    """
    tokenizer = load_tokenizer(base.source, base.load_revision)
    model = PeftModel.from_pretrained(
        load_base(base.source, base.load_revision, hardware), str(candidate_adapter), adapter_name="candidate"
    )
    eval_table = snapshot.read_eval()
    model.set_adapter("candidate")
    candidate = score_snapshot(model, tokenizer, eval_table, snapshot.eval_snapshot_hash, max_length=max_length)
    if parent_adapter is None:
        with model.disable_adapter():
            parent = score_snapshot(model, tokenizer, eval_table, snapshot.eval_snapshot_hash, max_length=max_length)
    else:
        model.load_adapter(str(parent_adapter), adapter_name="parent")
        model.set_adapter("parent")
        parent = score_snapshot(model, tokenizer, eval_table, snapshot.eval_snapshot_hash, max_length=max_length)
    return candidate, parent


def _as_float(value) -> float | None:
    """NaN and inf are kept (the gate names them); None (nothing scored) stays None."""
    return None if value is None else float(value)
