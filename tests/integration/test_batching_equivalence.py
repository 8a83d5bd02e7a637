"""Every batching mode trains on the same per-example loss: on the small base with a LoRA adapter that
matters (B not zero), each example's summed target NLL is the same alone, in padded batches, in
length-grouped and token-budget batches, and in flattened rows; a flattened row that kept the KV cache
would let its examples attend to each other; and a real run in each mode trains on every target token
once per epoch, with the padding its batches held."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.trainer_pt_utils import LengthGroupedSampler

from incremental.batching import FlattenedCollator, TokenBudgetBatchSampler, attention, plan_batching
from incremental.config import LLAMA_PROJECTIONS, LoraSettings, TrainSettings
from incremental.dataset import encode_examples, tokenize_train
from incremental.modeling import Hardware, attach_trainable_adapter, load_base, load_tokenizer
from incremental.training import train_adapter
from incremental.prompting import LATEST_LAYOUT

from conftest import case_table

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
N, BATCH = 12, 4


@pytest.fixture(scope="module")
def setup(small_base):
    tokenizer = load_tokenizer(str(small_base))
    torch.manual_seed(0)
    model = get_peft_model(
        load_base(str(small_base), None, CPU),
        # init_lora_weights=False: B is random too, so the adapter changes every logit.
        LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS), init_lora_weights=False),
    ).eval()
    table = case_table(N, seed=5)
    examples = encode_examples(
        tokenizer, table["artifact_type"].to_pylist(), table["prompt"].to_pylist(), table["target"].to_pylist(), 320, prompt_layout=LATEST_LAYOUT
    )
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    lengths = [len(f["input_ids"]) for f in features]
    assert max(lengths) > 1.5 * min(lengths), "the rows must differ in length for padding to matter"
    return model, tokenizer, features, lengths


def summed_nll(model, batch: dict, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Each example's summed target NLL in one forward pass of `batch`; `owners` says which example each
    label position belongs to (the same shape as the labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"][..., 1:]
    token_nll = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return torch.zeros(n, dtype=torch.float64).index_add_(0, owners[..., 1:].reshape(-1), token_nll.double())


def nll_by_mode(model, tokenizer, features, batches: list[list[int]], mode: str, lengths) -> torch.Tensor:
    """Per-example summed NLL with `batches` built by `mode`'s collator and attention (batching.py)."""
    batching = plan_batching(TrainSettings(batch_size=BATCH, batching=mode), tokenizer, lengths, model.config, "cpu")
    totals = torch.zeros(len(features), dtype=torch.float64)
    with attention(model, batching.attention):
        for indices in batches:
            batch = batching.collate([features[i] for i in indices])
            if mode == "flattened":
                assert batch["use_cache"] is False and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
                edges = batch["cu_seq_lens_q"].tolist()
                owners = torch.cat([torch.full((b - a,), i) for i, a, b in zip(indices, edges[:-1], edges[1:])])[None]
            else:
                owners = torch.tensor(indices)[:, None].expand_as(batch["labels"])
            totals += summed_nll(model, batch, owners, len(features))
    return totals


def alone(model, tokenizer, features, lengths) -> torch.Tensor:
    return nll_by_mode(model, tokenizer, features, [[i] for i in range(len(features))], "padded", lengths)


def test_per_example_loss_is_the_same_in_every_batching_mode(setup):
    model, tokenizer, features, lengths = setup
    reference = alone(model, tokenizer, features, lengths)
    assert (reference > 0).all()
    mixed = [list(range(i, min(i + BATCH, N))) for i in range(0, N, BATCH)]
    grouped = list(LengthGroupedSampler(BATCH, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    budget = plan_batching(
        TrainSettings(batching="token_budget", max_tokens_per_batch=3 * max(lengths)), tokenizer, lengths, model.config, "cpu"
    ).batch_sampler
    modes = {
        "padded": mixed,
        "length_grouped": [grouped[i : i + BATCH] for i in range(0, N, BATCH)],
        "token_budget": budget.batches(0),
        "flattened": mixed,
    }
    for mode, batches in modes.items():
        assert sorted(i for b in batches for i in b) == list(range(N)) and any(len(b) > 1 for b in batches)
        got = nll_by_mode(model, tokenizer, features, batches, mode, lengths)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-3, msg=lambda m, mode=mode: f"{mode}: {m}")


def test_a_flattened_row_with_the_kv_cache_on_leaks_across_examples(setup):
    """Why a flattened batch says use_cache=False: with a cache, transformers builds no per-example mask
    on SDPA, so the second example of a row attends to the first. With it off, SDPA's block-diagonal
    mask keeps them apart (slower than per-example attention, but right)."""
    model, tokenizer, features, lengths = setup
    pair = [0, 1]
    row = FlattenedCollator()([features[i] for i in pair])
    edges = row["cu_seq_lens_q"].tolist()
    owners = torch.cat([torch.full((b - a,), i) for i, a, b in zip(pair, edges[:-1], edges[1:])])[None]
    reference = alone(model, tokenizer, features, lengths)[pair]
    assert model.config._attn_implementation == "sdpa"
    plain = {k: v for k, v in row.items() if not k.startswith(("cu_seq", "max_length"))}  # SDPA reads position ids
    kept_apart = summed_nll(model, plain, owners, N)[pair]
    torch.testing.assert_close(kept_apart, reference, rtol=1e-5, atol=1e-3)
    leaked = summed_nll(model, {**plain, "use_cache": True}, owners, N)[pair]
    assert leaked[0] == pytest.approx(float(reference[0]), rel=1e-5)  # the first example has nothing before it
    assert abs(float(leaked[1] - reference[1])) > 1.0, "with the cache on, the second example should see the first"


def test_per_example_attention_refuses_a_padded_batch(setup):
    model, tokenizer, features, lengths = setup
    batching = plan_batching(TrainSettings(batching="flattened"), tokenizer, lengths, model.config, "cpu")
    padded = plan_batching(TrainSettings(batching="padded"), tokenizer, lengths, model.config, "cpu").collate(features[:2])
    with attention(model, batching.attention), pytest.raises(ValueError, match="flattened batches only"), torch.no_grad():
        model(**padded)
    assert model.config._attn_implementation == "sdpa", "the model's own attention is back after the block"


@pytest.mark.parametrize("mode", ["padded", "length_grouped", "token_budget", "flattened"])
def test_a_run_in_each_mode_trains_on_every_target_once_per_epoch(small_base, tmp_path, monkeypatch, mode):
    epochs = []  # the Trainer tells the token-budget sampler each epoch, so each epoch has its own order
    monkeypatch.setattr(TokenBudgetBatchSampler, "set_epoch", lambda self, epoch: epochs.append(epoch) or setattr(self, "epoch", epoch))
    tokenizer = load_tokenizer(str(small_base))
    model = attach_trainable_adapter(load_base(str(small_base), None, CPU), None, LoraSettings(r=4, alpha=8), CPU)
    dataset, _ = tokenize_train(case_table(24, seed=3), tokenizer, 320, prompt_layout=LATEST_LAYOUT)
    settings = TrainSettings(epochs=2, batch_size=8, learning_rate=5e-3, max_length=320, batching=mode)
    result = train_adapter(model, tokenizer, dataset, settings, tmp_path / "out", device="cpu", show_progress_bar=False)
    targets = sum(sum(label != -100 for label in row) for row in dataset["labels"])
    assert result.batching == mode and result.steps > 0
    assert result.target_tokens == 2 * targets
    assert result.real_tokens == 2 * sum(len(row) for row in dataset["input_ids"])
    assert list(dict.fromkeys(epochs)) == ([0, 1] if mode == "token_budget" else [])  # accelerate and the Trainer both tell it
    if mode == "flattened":
        assert result.pad_per_real_token == 0
        assert model.config._attn_implementation == "sdpa", "training set the model's own attention back"
    else:
        assert result.pad_per_real_token > 0
    assert result.train_loss is not None and result.train_loss > 0
