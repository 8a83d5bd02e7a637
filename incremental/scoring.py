"""The one scoring implementation: summed target NLL of (task, notes, target) triples, and greedy generation.

Used by evaluation (the gate's evidence), screening (suspect new rows) and the embedded base's build
report. Scores are keyed by a content hash of the triple and a scorer id (the scoring settings), so a
cache can reuse them. Knows nothing about versions, slices, policies or the database.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from incremental.dataset import IGNORE_INDEX, encode_examples
from incremental.prompting import build_prompt

__all__ = [
    "NllScores", "Triple", "generate_greedy", "partner_notes", "partner_pool", "prompt_ids", "score_nll", "score_triples", "scorer_id",
    "triple_hash",
]  # fmt: skip

# Bump when the way a score is computed changes, so cached scores of older code are not reused.
SCORING_VERSION = 1

Triple = tuple[str, str, str]  # (task, notes, target)


@dataclass(frozen=True)
class NllScores:
    """Per example: summed target NLL (nats) and scored target tokens (eos included)."""

    nll_sum: np.ndarray
    n_tokens: np.ndarray


def triple_hash(task: str, notes: str, target: str) -> str:
    digest = hashlib.sha256()
    for part in (task, notes, target):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()


def partner_pool(notes_oldest_first: Sequence[str], per_row: int) -> list[str]:
    """The first `per_row + 1` distinct notes: enough that every row has `per_row` partners besides its own."""
    return list(dict.fromkeys(notes_oldest_first))[: per_row + 1]


def partner_notes(pool: Sequence[str], own_notes: str, per_row: int) -> list[str]:
    """The notes a target is also scored under for its prompt gain: the pool's, its own left out."""
    return [notes for notes in pool if notes != own_notes][:per_row]


def scorer_id(kind: str, **settings) -> str:
    """A short id for a way of scoring ('nll', 'greedy') and the settings that change its numbers."""
    text = json.dumps({"kind": kind, "scoring_version": SCORING_VERSION, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def score_nll(model, tokenizer, tasks, notes, targets, *, max_length: int, prompt_layout: int, batch_size: int = 16) -> NllScores:
    """Summed NLL of each target given its prompt (in `prompt_layout`), one forward pass per length-sorted batch."""
    examples = encode_examples(tokenizer, tasks, notes, targets, max_length, prompt_layout=prompt_layout)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    nll_sum = np.zeros(len(examples))
    n_tokens = np.zeros(len(examples), dtype=np.int64)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    was_training = model.training
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
            sums = (token_nll * mask).sum(dim=1).double().cpu().numpy()
            counts = mask.sum(dim=1).cpu().numpy()
            for row, index in enumerate(order[start : start + batch_size]):
                nll_sum[index] = sums[row]
                n_tokens[index] = counts[row]
    model.train(was_training)
    return NllScores(nll_sum=nll_sum, n_tokens=n_tokens)


def score_triples(
    model, tokenizer, triples: Sequence[Triple], *, max_length: int, prompt_layout: int, cached: Mapping[str, tuple] | None = None
) -> dict[str, tuple[float, int]]:
    """{triple_hash: (nll_sum, n_tokens)} for every distinct triple; those in `cached` are not scored again."""
    cached = cached or {}
    wanted = {triple_hash(*t): t for t in triples}
    result = {h: (float(cached[h][0]), int(cached[h][1])) for h in wanted if h in cached}
    missing = [h for h in wanted if h not in result]
    if missing:
        tasks, notes, targets = zip(*(wanted[h] for h in missing))
        scores = score_nll(
            model, tokenizer, list(tasks), list(notes), list(targets), max_length=max_length, prompt_layout=prompt_layout
        )
        for h, nll, n in zip(missing, scores.nll_sum, scores.n_tokens):
            result[h] = (float(nll), int(n))
    return result


def prompt_ids(tokenizer, task: str, notes: str, *, prompt_layout: int) -> list[int]:
    """Token ids of a generation prompt: BOS, then the prompt in `prompt_layout`, as training lays it out.

    Notes may contain "<s>" or "</s>" (HTML strikethrough): they are text, never the special tokens.
    """
    text = build_prompt(task, notes, prompt_layout=prompt_layout)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


def generate_greedy(
    model, tokenizer, prompts: Sequence[tuple[str, str]], *, max_new_tokens: int, prompt_layout: int, batch_size: int = 8
) -> list[str]:
    """Greedy completions of (task, notes) prompts in `prompt_layout`, decoded without special tokens, in input order.

    The one decoder: serving (one request at a time), the gate's generation metrics and the quality
    reports all generate through it, so what the gate judges is what users are served. Prompts are
    batched by length and padded on the left, so every row continues from its own last token; the
    attention mask keeps padding out of attention and positions (tests/integration/test_serving.py
    checks that a batched generation equals the one served).
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, task, notes, prompt_layout=prompt_layout) for task, notes in prompts]
    # Similar lengths share a batch: less padding, and the order of requests does not change a text.
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(rows), width), dtype=torch.long)
                for row, index in enumerate(rows):
                    ids = encoded[index]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,  # load_base turns the cache off for training; decoding wants it
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                for index, text in zip(rows, texts):
                    outputs[index] = text
    finally:
        model.train(was_training)
    return [text for text in outputs if text is not None]
