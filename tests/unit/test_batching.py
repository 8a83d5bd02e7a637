"""Batching without a model: token-budget batches stay within their budget and cover every example once
per epoch, deterministically; flattened batches count no padding and per-example attention pairs;
`auto` resolves per device; a budget without token_budget batching is refused, naming the field."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from incremental.batching import CPU_DEFAULT, FlattenedCollator, TokenBudgetBatchSampler, plan_batching, resolve_mode
from incremental.config import TrainSettings
from incremental.throughput import CountingCollator, packed_lengths


def lengths_of(n: int, seed: int) -> list[int]:
    draw = random.Random(seed)
    return [draw.randint(20, 260) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_budget_batches_stay_within_the_budget_and_cover_each_example_once(seed):
    lengths = lengths_of(200, seed) + [900, 1200]  # two examples longer than the budget
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=1000, seed=seed)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler), "every epoch has the batch count the Trainer's schedule was built on"
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        for batch in batches:
            cost = len(batch) * max(lengths[i] for i in batch)
            assert cost <= 1000 or len(batch) == 1, f"batch {batch} holds {cost} padded tokens"
        assert [1200] in [[lengths[i] for i in batch] for batch in batches]
    # Packed, not merely bounded: sorting by length leaves little padding (the mean waste here is small).
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in sampler.batches(0))
    assert (padded - real) / real < 0.05


def test_token_budget_batches_are_deterministic_for_a_seed_and_shuffled_per_epoch():
    lengths = lengths_of(120, 7)
    first = TokenBudgetBatchSampler(lengths, max_tokens=800, seed=3)
    again = TokenBudgetBatchSampler(lengths, max_tokens=800, seed=3)
    assert first.batches(0) == again.batches(0)
    assert first.batches(0) != first.batches(1), "each epoch serves its batches in a new order"
    assert first.batches(0) != TokenBudgetBatchSampler(lengths, max_tokens=800, seed=4).batches(0)
    first.set_epoch(1)
    assert list(first) == again.batches(1)
    # Not served short to long: the batches' longest lengths are not sorted.
    longest = [max(lengths[i] for i in batch) for batch in first.batches(0)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_the_default_budget_keeps_about_the_steps_of_batch_size_examples():
    lengths = lengths_of(192, 11)
    batching = plan_batching(TrainSettings(batch_size=8, batching="token_budget"), None, lengths, SimpleNamespace(_attn_implementation="sdpa"), "cpu")
    assert batching.batch_sampler.max_tokens == 8 * round(sum(lengths) / len(lengths))
    assert 0.8 * 192 / 8 <= batching.batches_per_epoch <= 1.5 * 192 / 8


def test_a_flattened_batch_counts_no_padding_and_the_pairs_within_each_example():
    features = [{"input_ids": list(range(1, n + 1)), "labels": [-100] * 3 + list(range(4, n + 1))} for n in (5, 9, 7)]
    counting = CountingCollator(FlattenedCollator())
    batch = counting(features)
    assert batch["use_cache"] is False and "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 21) and batch["cu_seq_lens_q"].tolist() == [0, 5, 14, 21]
    assert packed_lengths(batch["position_ids"]).tolist() == [5, 9, 7]
    tally = counting.tally
    assert (tally.tokens, tally.padded, tally.pad_per_real_token) == (21, 21, 0.0)
    assert tally.attended_pairs == 5 * 6 // 2 + 9 * 10 // 2 + 7 * 8 // 2  # each example alone, never 21 * 22 / 2
    assert tally.targets == 2 + 6 + 4


@pytest.mark.parametrize(
    ("requested", "attention", "device", "expected"),
    [
        ("auto", "sdpa", "cpu", CPU_DEFAULT),
        ("auto", "flash_attention_2", "cuda", "flattened"),
        ("auto", "sdpa", "cuda", CPU_DEFAULT),  # no variable-length kernel loaded: as on the CPU
        ("padded", "flash_attention_2", "cuda", "padded"),
        ("token_budget", "sdpa", "cpu", "token_budget"),
    ],
)
def test_auto_resolves_per_device(requested, attention, device, expected):
    assert resolve_mode(requested, SimpleNamespace(_attn_implementation=attention), device) == expected


def test_flattened_trains_with_flash_attention_where_loaded_else_per_example_sdpa():
    settings = TrainSettings(batching="flattened")
    flash = plan_batching(settings, None, [10, 20], SimpleNamespace(_attn_implementation="flash_attention_2"), "cuda")
    sdpa = plan_batching(settings, None, [10, 20], SimpleNamespace(_attn_implementation="sdpa"), "cpu")
    assert flash.attention is None and sdpa.attention == "incremental_per_example_sdpa"


def test_a_budget_without_token_budget_batching_is_refused_naming_the_field_and_the_fix():
    with pytest.raises(ValidationError, match=r"max_tokens_per_batch=4096 only applies to batching='token_budget'.*set batching='token_budget'"):
        TrainSettings(batching="flattened", max_tokens_per_batch=4096)
    assert TrainSettings(batching="token_budget", max_tokens_per_batch=4096).max_tokens_per_batch == 4096
