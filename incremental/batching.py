"""Training batches that spend no compute on padding, chosen per device (`TrainSettings.batching`).

- padded: random batches of `batch_size` examples, right-padded to the longest (the Trainer's default);
- length_grouped: transformers' `LengthGroupedSampler` (length-sorted megabatches, served longest first);
- token_budget: `TokenBudgetBatchSampler`, batches cut from the length-sorted split so that examples x
  longest stays within `max_tokens_per_batch`, served in a fresh random order every epoch;
- flattened: random batches of `batch_size` examples joined into one row (transformers'
  `DataCollatorWithFlattening`): no padding, position ids restart at each example, and each example
  attends only to itself: FlashAttention's variable-length kernel where the model was loaded with it,
  else SDPA run per example (`per_example_sdpa`). Without either, SDPA on a flattened row builds a
  block-diagonal mask over the whole row (transformers' `find_packed_sequence_indices`) and attends over
  all of it, and with a KV cache it builds no such mask at all: examples attend to each other. So a
  flattened batch always carries `use_cache=False`.

`auto` is flattened where FlashAttention is loaded (CUDA), else `CPU_DEFAULT`, chosen by measurement
(BENCHMARKS.md, train_throughput): on the CPU, flattened rows with attention per example run as fast as
token-budget batches (both about 1.5x random padded batches) and train on exactly the batches random
padding does, where length-sorted batches (token_budget, length_grouped) are nearly one artifact type
each and learned clearly less. Knows nothing about feedback, versions or throughput accounting:
`training.py` hands the collator, the sampler and the attention of a `Batching` to `BatchingTrainer`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import AttentionInterface, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import is_datasets_available
from transformers.utils.generic import is_flash_attention_requested

from incremental.config import BatchingMode, TrainSettings

__all__ = [
    "CPU_DEFAULT", "PER_EXAMPLE_SDPA", "Batching", "BatchingTrainer", "FlattenedCollator", "TokenBudgetBatchSampler",
    "attention", "per_example_sdpa", "plan_batching", "resolve_mode",
]  # fmt: skip

# The mode `auto` picks where no FlashAttention is loaded (the CPU, or CUDA without the flash-attn
# package): measured on the CPU (BENCHMARKS.md, train_throughput), not yet on a GPU.
CPU_DEFAULT: BatchingMode = "flattened"
# The attention implementation a flattened batch trains with when the model has no FlashAttention.
PER_EXAMPLE_SDPA = "incremental_per_example_sdpa"


def resolve_mode(requested: BatchingMode, model_config, device: str) -> BatchingMode:
    """The mode `requested` names; for `auto`, flattened where the model runs FlashAttention on CUDA,
    else `CPU_DEFAULT`."""
    if requested != "auto":
        return requested
    if device == "cuda" and is_flash_attention_requested(model_config):
        return "flattened"
    return CPU_DEFAULT


@dataclass(frozen=True)
class Batching:
    """How one run batches its train split: what `training.py` gives the Trainer."""

    mode: BatchingMode  # resolved, never "auto"
    collate: Callable[[list[dict]], dict]
    batch_sampler: TokenBudgetBatchSampler | None  # token_budget: whole batches; else the Trainer samples
    sampling_strategy: str  # the Trainer's `train_sampling_strategy` where it samples
    batches_per_epoch: int
    attention: str | None  # the attention implementation to train with; None: the model's own

    def describe(self) -> str:
        if self.batch_sampler is not None:
            return f"{self.mode} ({self.batch_sampler.max_tokens} tokens per batch)"
        return self.mode if self.attention is None else f"{self.mode} (attention per example: {self.attention})"


def plan_batching(settings: TrainSettings, tokenizer, lengths: Sequence[int], model_config, device: str) -> Batching:
    """The batching of a train split whose examples are `lengths` tokens long, for a model with
    `model_config` on `device`."""
    mode = resolve_mode(settings.batching, model_config, device)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True)
    by_count = math.ceil(len(lengths) / settings.batch_size)
    if mode == "padded":
        return Batching(mode, padded, None, "random", by_count, None)
    if mode == "length_grouped":
        return Batching(mode, padded, None, "group_by_length", by_count, None)
    if mode == "token_budget":
        budget = settings.max_tokens_per_batch or settings.batch_size * max(1, round(sum(lengths) / max(1, len(lengths))))
        sampler = TokenBudgetBatchSampler(lengths, budget, settings.seed)
        return Batching(mode, padded, sampler, "random", len(sampler), None)
    if mode == "flattened":
        flash = is_flash_attention_requested(model_config)
        return Batching(mode, FlattenedCollator(), None, "random", by_count, None if flash else PER_EXAMPLE_SDPA)
    raise ValueError(f"batching={mode!r} is not one of auto, padded, length_grouped, token_budget, flattened")


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of examples of similar length, each holding at most `max_tokens` padded tokens (its
    examples x its longest); an example longer than that is a batch of its own.

    Every epoch sorts the examples by length (equal lengths in a seeded random order), cuts the sorted
    run greedily into batches, and serves them in a seeded random order, so no epoch runs short to
    long. The batch sizes depend on the lengths alone: every epoch has `len(self)` batches, which the
    Trainer's schedule counts on. Deterministic for a seed and epoch (`set_epoch`, called by the Trainer).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens_per_batch must be at least 1, got {max_tokens}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0
        self._count = len(self._cut(sorted(range(len(self.lengths)), key=self.lengths.__getitem__)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        draw = random.Random(f"token_budget:{self.seed}:{epoch}")
        tiebreak = [draw.random() for _ in self.lengths]
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], tiebreak[i]))
        batches = self._cut(order)
        draw.shuffle(batches)
        return batches

    def _cut(self, ascending: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        batch: list[int] = []
        for index in ascending:  # ascending, so this example is the batch's longest
            if batch and (len(batch) + 1) * self.lengths[index] > self.max_tokens:
                batches.append(batch)
                batch = []
            batch.append(index)
        if batch:
            batches.append(batch)
        return batches


class FlattenedCollator:
    """transformers' `DataCollatorWithFlattening` (one row, positions restarting at each example, the first
    label of each example ignored, FlashAttention's sequence boundaries), plus `use_cache=False`: with a
    cache, transformers builds no per-example mask and the examples of a row attend to each other."""

    def __init__(self):
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["use_cache"] = False
        return batch


def per_example_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Causal SDPA over each example of a flattened row on its own, bounded by the row's `cu_seq_lens_q`:
    what FlashAttention's variable-length kernel computes, from one SDPA call per example, so attention
    costs the pairs within examples, never the whole row's. Refuses a batch without the boundaries (this
    implementation builds no mask, so a padded batch would attend to its padding)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        raise ValueError(
            f"attention {PER_EXAMPLE_SDPA!r} takes flattened batches only (one row with cu_seq_lens_q, as "
            "DataCollatorWithFlattening(return_flash_attn_kwargs=True) builds them); set the model's own attention back "
            "before it sees padded batches"
        )
    sizes = [end - start for start, end in itertools.pairwise(bounds.tolist())]
    # split, not slices: its backward is one concatenation, where each slice's would fill a whole-row gradient.
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    ]
    return torch.cat(outputs, dim=1), None


@contextmanager
def attention(model, implementation: str | None):
    """`model` computes attention with `implementation` inside the block (None: unchanged), and with its
    own again after it, whatever happens inside."""
    if implementation is None:
        yield
        return
    if implementation == PER_EXAMPLE_SDPA:
        AttentionInterface.register(PER_EXAMPLE_SDPA, per_example_sdpa)
    own = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


class BatchingTrainer(Trainer):
    """The Hugging Face Trainer, fed by a `Batching`: its batch sampler where it has one (token_budget),
    and trained with its attention (flattened without FlashAttention). The loop, loss normalization
    (target tokens per optimizer step: `num_items_in_batch`) and schedule are the Trainer's own."""

    def __init__(self, *args, batching: Batching, **kwargs):
        super().__init__(*args, **kwargs)
        self.batching = batching

    def train(self, *args, **kwargs):
        with attention(self.model, self.batching.attention):
            return super().train(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        sampler = self.batching.batch_sampler
        if sampler is None:
            return super().get_train_dataloader()
        if self.args.world_size > 1:
            raise ValueError("batching='token_budget' trains on one process; use batching='flattened' or 'padded' for several")
        dataset, collate = self.train_dataset, self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="Training")
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)


def _is_hf_dataset(dataset) -> bool:
    if not is_datasets_available():
        return False
    import datasets  # only where installed, as the Trainer itself imports it

    return isinstance(dataset, datasets.Dataset)
