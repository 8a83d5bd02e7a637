"""QLoRA on a real GPU: the base loads in 4-bit NF4, a LoRA adapter trains, saves as safetensors,
and reloads as the same function (continue-from-parent on the quantized path). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from incremental.config import LoraSettings, TrainSettings
from incremental.dataset import encode_examples
from incremental.modeling import Hardware, attach_trainable_adapter, load_base, load_tokenizer
from incremental.synthetic import generate_cases
from incremental.training import train_adapter
from incremental.prompting import LATEST_LAYOUT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU_4BIT = Hardware(device="cuda", quantization="4bit")


def examples(tokenizer, n, seed):
    cases = generate_cases(n, seed)
    encoded = encode_examples(
        tokenizer, [c.artifact_type for c in cases], [c.notes for c in cases], [c.artifact for c in cases], 320, prompt_layout=LATEST_LAYOUT
    )
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


def loss_on(model, rows):
    model.eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device="cuda")
            labels = torch.tensor([row["labels"]], device="cuda")
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def test_qlora_trains_saves_and_continues_on_cuda(small_base, tmp_path):
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(small_base))
    base = load_base(str(small_base), None, GPU_4BIT)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()), "base did not load in 4-bit"
    model = attach_trainable_adapter(base, None, LoraSettings(r=8, alpha=16), GPU_4BIT)
    probe = examples(tokenizer, 8, 9)
    before = loss_on(model, probe)
    settings = TrainSettings(epochs=2, batch_size=8, learning_rate=5e-3)
    train_adapter(model, tokenizer, examples(tokenizer, 32, 1), settings, tmp_path / "v1", device="cuda",
                  show_progress_bar=False)  # fmt: skip
    after = loss_on(model, probe)
    assert after < before, f"QLoRA did not learn: {before:.3f} -> {after:.3f}"
    assert (tmp_path / "v1" / "adapter_model.safetensors").is_file()

    reloaded = attach_trainable_adapter(load_base(str(small_base), None, GPU_4BIT), tmp_path / "v1", LoraSettings(), GPU_4BIT)
    assert loss_on(reloaded, probe) == pytest.approx(after, abs=2e-3)
