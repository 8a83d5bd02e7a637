"""Throughput arithmetic: the model FLOPs of a LoRA step on known shapes, what a batch holds, MFU,
and the device peak's cache (measured once, reused; another thread count is another key)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from incremental.config import LLAMA_PROJECTIONS
from incremental.manifest import TrainingRecord
from incremental.throughput import CountingCollator, LoraFlops, TokenTally, measure_matmul_peak, measured_peak, mfu, peak_key

LLAMA_2_7B = dict(
    vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008,
)  # fmt: skip


def meta_llama(**shape) -> LlamaForCausalLM:
    """A Llama of this shape with no memory behind it (parameters on the meta device), frozen."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return model.requires_grad_(False)


def test_lora_flops_of_llama_2_7b_with_rank_16_on_every_projection():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(meta_llama(**LLAMA_2_7B), LoraConfig(r=16, target_modules=list(LLAMA_PROJECTIONS)))
    flops = LoraFlops.of(model)
    d, ff, layers, vocab = 4096, 11008, 32, 32000
    # Per layer q, k, v, o (d×d each) and gate, up, down (d×ff each), then the output head; the
    # input embedding is a lookup.
    assert flops.frozen_params == layers * (4 * d * d + 3 * d * ff) + vocab * d == 6_607_077_376
    # LoRA r=16: A (r×in) and B (out×r) on each of the 7 projections: about 40.0M for CodeLlama-7B
    # in ../shared/reference/performance.md, section 3.1.
    assert flops.trainable_params == layers * 16 * (4 * (d + d) + 3 * (d + ff)) == 39_976_960
    assert (flops.layers, flops.attention_width) == (32, 4096)
    per_token = 4 * 6_607_077_376 + 6 * 39_976_960 + 12 * 32 * 4096 * 1025 / 2
    assert flops.per_token(1024) == pytest.approx(per_token)
    # The reference's ceiling uses PaLM's full-matrix attention term (12·L·d·T, not halved): 2.8e10.
    assert flops.per_token(1024) + 12 * 32 * 4096 * (1024 - 1025 / 2) == pytest.approx(2.80e10, rel=0.01)


def test_grouped_kv_heads_shrink_the_weights_but_not_the_attention_width():
    model = meta_llama(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, tie_word_embeddings=True,
    )  # fmt: skip
    flops = LoraFlops.of(model)
    q_width, kv_width = 8 * 16, 2 * 16
    per_layer = 64 * q_width + 2 * 64 * kv_width + q_width * 64 + 3 * 64 * 96
    assert flops.frozen_params == 2 * per_layer + 100 * 64  # the tied head counts once, as a product
    assert (flops.trainable_params, flops.attention_width) == (0, 128)


def test_total_flops_count_the_causal_pairs_of_each_sequence():
    flops = LoraFlops(frozen_params=1000, trainable_params=10, layers=2, attention_width=8)
    assert flops.per_token_weights == 4060
    # Sequences of 3 and 5 real tokens: 8 tokens, 3·4/2 + 5·6/2 = 21 causal query-key pairs.
    assert flops.total(8, 21) == 4060 * 8 + 12 * 2 * 8 * 21
    # One sequence: the per-token figure times its length is its total.
    assert flops.per_token(5) * 5 == pytest.approx(flops.total(5, 15))


def test_a_tally_counts_real_padded_and_target_tokens_and_causal_pairs():
    tally = TokenTally()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 4, 5, -100, -100], [-100, -100, 6, 7, 8]])
    tally.add(mask, labels)
    assert (tally.batches, tally.tokens, tally.padded, tally.targets, tally.attended_pairs) == (1, 8, 10, 5, 21)
    assert tally.pad_per_real_token == pytest.approx(0.25)
    tally.add(torch.ones(1, 4, dtype=torch.int64))
    assert (tally.tokens, tally.padded, tally.attended_pairs) == (12, 14, 31)
    assert TokenTally().pad_per_real_token is None


def test_the_counting_collator_changes_no_batch():
    batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
             "labels": torch.tensor([[-100, 6, -100]])}  # fmt: skip
    counting = CountingCollator(lambda features: batch)
    assert counting([{"input_ids": [5, 6]}]) is batch
    assert (counting.tally.tokens, counting.tally.padded, counting.tally.targets) == (2, 3, 1)
    # A collator without an attention mask pads nothing: every position is real.
    unpadded = CountingCollator(lambda features: {"input_ids": torch.tensor([[5, 6, 7]])})
    unpadded([{}])
    assert (unpadded.tally.tokens, unpadded.tally.padded) == (3, 3)


def test_mfu_is_achieved_flops_per_second_over_the_peak():
    assert mfu(2e12, 4.0, 1e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1e12)


@pytest.fixture
def threads():
    """Set torch's thread count for one test; restored after (torch's count is process-wide state)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_the_peak_is_measured_once_per_key_and_then_read_from_the_cache(tmp_path, threads):
    cache = tmp_path / "cache" / "peak.json"
    measured = []

    def measure(device: str) -> float:
        measured.append(torch.get_num_threads())
        return 1e9 * (10 + torch.get_num_threads())

    threads(1)
    assert measured_peak("cpu", cache, measure=measure) == 11e9
    assert measured_peak("cpu", cache, measure=measure) == 11e9
    assert measured == [1], "the second call must read the cache"
    threads(2)
    assert measured_peak("cpu", cache, measure=measure) == 12e9, "another thread count is another key"
    assert measured == [1, 2]
    stored = json.loads(cache.read_text())
    assert stored["schema"] == 1 and len(stored["peaks"]) == 2
    key = peak_key("cpu")
    assert key.endswith("| float32 | 2 threads") and stored["peaks"][key]["flops"] == 12e9
    # Another process (a fresh call with the same file) reuses it as well.
    assert measured_peak("cpu", cache, measure=lambda device: pytest.fail("measured again")) == 12e9


def test_a_damaged_peak_cache_is_measured_again_and_rewritten(tmp_path):
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    assert measured_peak("cpu", cache, measure=lambda device: 5e9) == 5e9
    assert json.loads(cache.read_text())["peaks"][peak_key("cpu")]["flops"] == 5e9


def test_an_unwritable_peak_cache_costs_a_measurement_not_the_run(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert measured_peak("cpu", blocker / "peak.json", measure=lambda device: 5e9) == 5e9
    assert "Could not cache the measured peak" in caplog.text


def test_a_cpu_matmul_peak_is_a_plausible_rate():
    peak = measure_matmul_peak("cpu", size=256, trials=2)
    assert 1e8 < peak < 1e14


def test_training_records_written_before_throughput_still_load():
    old = {"mode": "base", "device": "cpu", "quantization": "none", "steps": 2, "epochs": 1.0, "train_loss": 1.5,
           "trainable_parameters": 10, "target_tokens": 100, "wall_seconds": 3.0, "n_truncated": 0}  # fmt: skip
    record = TrainingRecord.model_validate(old)
    assert (record.tokens_per_second, record.pad_per_real_token, record.mfu, record.peak_flops) == (None,) * 4
    new = TrainingRecord.model_validate({**old, "tokens_per_second": 900.5, "pad_per_real_token": 0.06, "mfu": 0.4,
                                         "peak_flops": 9e10})  # fmt: skip
    assert TrainingRecord.model_validate_json(new.model_dump_json()) == new
