"""QLoRA on CPU: bitsandbytes loads the base in 4-bit NF4 and trains LoRA on it here too, so the
quantized path is tested on every machine, not only on a GPU (tests/gpu/test_qlora_cuda.py is its
CUDA twin). v1 trains from scratch, v2 continues from v1's adapter on a fresh 4-bit base; the flow
runs the same way end to end; activation checkpointing changes memory, not the numbers.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from incremental.config import LoraSettings, RunConfig, TrainSettings
from incremental.dataset import encode_examples
from incremental.layout import ADAPTER_WEIGHTS
from incremental.modeling import Hardware, attach_trainable_adapter, load_base, load_tokenizer
from incremental.synthetic import generate_cases
from incremental.training import train_adapter
from incremental.prompting import LATEST_LAYOUT

pytestmark = pytest.mark.integration
CPU_4BIT = Hardware(device="cpu", quantization="4bit")
CPU = Hardware(device="cpu", quantization="none")
LORA = LoraSettings(r=8, alpha=16)
STEP = TrainSettings(epochs=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)


def examples(tokenizer, n: int, seed: int) -> list[dict]:
    cases = generate_cases(n, seed)
    encoded = encode_examples(
        tokenizer, [c.artifact_type for c in cases], [c.notes for c in cases], [c.artifact for c in cases], 256, prompt_layout=LATEST_LAYOUT
    )
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


def mean_loss(model, rows: list[dict]) -> float:
    """Mean per-example loss, one example at a time (no padding, so nothing depends on batching)."""
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss) for r in rows]
    return sum(losses) / len(losses)


def four_bit_modules(model) -> int:
    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def test_qlora_trains_saves_and_continues_on_cpu(small_base, tmp_path):
    tokenizer = load_tokenizer(str(small_base))
    base = load_base(str(small_base), None, CPU_4BIT)
    # Every projection of every decoder layer is NF4 (lm_head stays float, as transformers keeps it).
    n_layers, n_projections = base.config.num_hidden_layers, len(LORA.target_modules)
    assert four_bit_modules(base) == n_layers * n_projections, "base did not load in 4-bit"
    assert {m.weight.quant_state.quant_type for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)} == {"nf4"}

    model = attach_trainable_adapter(base, None, LORA, CPU_4BIT)
    train_rows, new_rows = examples(tokenizer, 16, 1), examples(tokenizer, 16, 2)
    start = mean_loss(model, train_rows)
    train_adapter(model, tokenizer, train_rows, STEP, tmp_path / "v1", device="cpu", show_progress_bar=False)
    v1_final = mean_loss(model, train_rows)
    assert v1_final < start - 0.05, f"4-bit LoRA did not learn its train rows: {start:.3f} -> {v1_final:.3f}"
    with safe_open(str(tmp_path / "v1" / ADAPTER_WEIGHTS), framework="pt") as weights:
        assert weights.keys() and all("lora_" in key for key in weights.keys())

    # v2 on a fresh 4-bit base with v1's adapter, trainable: it starts where v1 ended (continue, not
    # restart: a fresh adapter would start at `start`), then learns further on new rows.
    fresh = load_base(str(small_base), None, CPU_4BIT)
    assert four_bit_modules(fresh) == n_layers * n_projections
    continued = attach_trainable_adapter(fresh, tmp_path / "v1", LoraSettings(), CPU_4BIT)
    assert mean_loss(continued, train_rows) == pytest.approx(v1_final, abs=1e-4)
    before_new = mean_loss(continued, new_rows)
    train_adapter(continued, tokenizer, new_rows, STEP, tmp_path / "v2", device="cpu", show_progress_bar=False)
    assert mean_loss(continued, new_rows) < before_new - 0.05, "v2 did not train further"
    with safe_open(str(tmp_path / "v1" / ADAPTER_WEIGHTS), framework="pt") as v1, safe_open(
        str(tmp_path / "v2" / ADAPTER_WEIGHTS), framework="pt"
    ) as v2:
        assert v1.keys() == v2.keys()
        assert all(not torch.equal(v1.get_tensor(k), v2.get_tensor(k)) for k in v1.keys()), "v2 left some LoRA matrix unchanged"


def test_evaluating_a_trainable_4bit_model_first_leaves_its_gradients_alone(small_base, tmp_path):
    """bitsandbytes' CPU inference kernel (taken on CPUs with AVX512-BF16 by a layer run in eval mode)
    has no backward; a trainable model must not switch to it, or training after any evaluation loses
    the gradients through the base layers. Trivially true on a CPU without AVX512-BF16."""
    tokenizer = load_tokenizer(str(small_base))
    rows = examples(tokenizer, 4, 4)
    width = min(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"][:width] for r in rows])
    start = attach_trainable_adapter(load_base(str(small_base), None, CPU_4BIT), None, LORA, CPU_4BIT)
    for name, parameter in start.named_parameters():
        if "lora_B" in name:  # B = 0 at init: give every layer's LoRA a gradient through the base layers
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(0))
    start.save_pretrained(str(tmp_path / "start"))

    gradients = []
    for evaluate_first in (False, True):
        model = attach_trainable_adapter(load_base(str(small_base), None, CPU_4BIT), tmp_path / "start", LORA, CPU_4BIT)
        if evaluate_first:
            mean_loss(model, rows[:1])
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, f"{name} has no gradient; the comparison would prove nothing"
        torch.testing.assert_close(gradients[1][name], gradient, rtol=0, atol=0)


@pytest.mark.parametrize("hardware", [CPU, CPU_4BIT], ids=["float32", "4bit"])
def test_gradient_checkpointing_changes_memory_not_numbers(small_base, tmp_path, hardware):
    """The same adapter trained on the same rows with checkpointing off and on: the same loss and the
    same weights, while autograd keeps far fewer bytes of activations for the backward pass."""
    tokenizer = load_tokenizer(str(small_base))
    rows = examples(tokenizer, 16, 3)
    start = attach_trainable_adapter(load_base(str(small_base), None, hardware), None, LORA, hardware)
    start.save_pretrained(str(tmp_path / "start"))

    trained = {}
    for checkpointing in (False, True):
        model = attach_trainable_adapter(
            load_base(str(small_base), None, hardware), tmp_path / "start", LORA, hardware, gradient_checkpointing=checkpointing
        )
        assert model.get_base_model().is_activation_checkpointing is checkpointing
        kept = saved_activation_bytes()
        with torch.autograd.graph.saved_tensors_hooks(kept.pack, kept.unpack):
            result = train_adapter(model, tokenizer, rows, STEP, tmp_path / str(checkpointing), device="cpu", show_progress_bar=False)
        with safe_open(str(tmp_path / str(checkpointing) / ADAPTER_WEIGHTS), framework="pt") as weights:
            trained[checkpointing] = (result, kept.total, {k: weights.get_tensor(k) for k in weights.keys()})

    (off, off_bytes, off_weights), (on, on_bytes, on_weights) = trained[False], trained[True]
    assert on.steps == off.steps
    assert on.train_loss == pytest.approx(off.train_loss, rel=1e-6)
    for key, weight in off_weights.items():
        torch.testing.assert_close(on_weights[key], weight, rtol=1e-4, atol=1e-6)
        assert not torch.equal(weight, start_weight(tmp_path, key)), f"{key} did not train; the comparison would prove nothing"
    # Inside a checkpointed layer torch's own hooks take over and keep nothing; what is left here is
    # the layers' inputs and everything outside the decoder layers (embeddings, norm, lm_head, loss).
    assert on_bytes < 0.6 * off_bytes, f"checkpointing kept {on_bytes} of {off_bytes} bytes"


class saved_activation_bytes:
    """Adds up the tensors autograd saves for the backward pass (outside checkpointed regions)."""

    def __init__(self):
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.total += tensor.numel() * tensor.element_size()
        return tensor

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def start_weight(tmp_path, key: str) -> torch.Tensor:
    with safe_open(str(tmp_path / "start" / ADAPTER_WEIGHTS), framework="pt") as weights:
        return weights.get_tensor(key)


QUICK = RunConfig.model_validate(
    {
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 5e-3, "max_length": 256},
        "gate": {
            "target_nll": {"margin": 1.0}, "preference_margin": {"margin": 1.0}, "prompt_gain": {"margin": 0.03, "gated": False},
            "min_eval_examples": 1,
            "generation_rows": 2, "max_new_tokens": 16, "screening": {"enabled": False},
        },
    }
)  # fmt: skip


def test_the_flow_runs_in_4bit_on_cpu(prefect_api, env, monkeypatch):
    """`INCREMENTAL_QUANTIZATION=4bit` on a CPU: v1 from the base, v2 from v1, both recorded as 4-bit."""
    from flows.retrain import retrain
    from incremental.feedback import FeedbackStore
    from incremental.registry import Registry
    from incremental.synthetic import synthetic_feedback

    monkeypatch.setenv("INCREMENTAL_QUANTIZATION", "4bit")
    store = FeedbackStore(env.db_path)
    store.init()
    registry = Registry(env.models_root, env.model)

    store.add_many(synthetic_feedback(40, 1, model=env.model))
    first = retrain(config=QUICK)
    assert first.status == "accepted", first.reasons
    store.add_many(synthetic_feedback(20, 2, model=env.model))
    second = retrain(config=QUICK)
    assert second.parent == first.version, second.reasons

    v1, v2 = registry.get(first.version).manifest, registry.get(second.version).manifest
    assert (v1.training.mode, v2.training.mode) == ("base", "incremental")
    assert {v1.training.quantization, v2.training.quantization} == {"4bit"}
    assert {v1.training.device, v2.training.device} == {"cpu"}
    assert v2.parent == first.version and v2.training.steps > 0
