"""Training on a real tiny model: continuing the parent's adapter is really continuing it.

The canonical LoRA checks (after TRL): base weights unchanged, LoRA weights changed; plus the
continue-from-parent check: the reloaded parent computes exactly the parent's loss, and the
parent's adapter config wins over the run config.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from incremental.config import LoraSettings, RunConfig, TrainSettings
from incremental.dataset import encode_examples, assemble_plan, tokenize_train
from incremental.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from incremental.modeling import Hardware, ResolvedBase, attach_trainable_adapter, load_base, load_tokenizer
from incremental.manifest import BaseModelRef
from incremental.training import train_adapter, train_candidate
from incremental.prompting import LATEST_LAYOUT

from conftest import case_table as rows
from conftest import eval_table

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
FAST = TrainSettings(epochs=1, batch_size=8, learning_rate=5e-3, max_length=320)


def batch_loss(model, tokenizer, table: pa.Table) -> float:
    examples = encode_examples(
        tokenizer, table["artifact_type"].to_pylist(), table["prompt"].to_pylist(), table["target"].to_pylist(), 320, prompt_layout=LATEST_LAYOUT
    )
    width = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in examples])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e.input_ids) for e in examples])[:, None]).long()
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def train_version(small_base, parent_dir, out_dir, table, lora=LoraSettings(r=8, alpha=16)):
    tokenizer = load_tokenizer(str(small_base))
    model = attach_trainable_adapter(load_base(str(small_base), None, CPU), parent_dir, lora, CPU)
    dataset, _ = tokenize_train(table, tokenizer, 320, prompt_layout=LATEST_LAYOUT)
    train_adapter(model, tokenizer, dataset, FAST, out_dir, device="cpu", show_progress_bar=False)
    return model, tokenizer


def test_continue_from_parent(small_base, tmp_path):
    first, probe = rows(32, seed=1), rows(8, seed=9)
    parent_model, tokenizer = train_version(small_base, None, tmp_path / "v1", first)
    parent_loss = batch_loss(parent_model, tokenizer, probe)
    base_loss = batch_loss(load_base(str(small_base), None, CPU), tokenizer, probe)
    assert parent_loss < base_loss, "v1 learned nothing; the test would prove nothing"

    # Reloaded from disk, trainable: the same function as the parent, not a fresh adapter.
    reloaded = attach_trainable_adapter(load_base(str(small_base), None, CPU), tmp_path / "v1", LoraSettings(), CPU)
    assert batch_loss(reloaded, tokenizer, probe) == pytest.approx(parent_loss, abs=1e-5)

    # Continue training on new rows with a run config asking for another rank: the parent's wins.
    train_version(small_base, tmp_path / "v1", tmp_path / "v2", rows(32, seed=2), lora=LoraSettings(r=4, alpha=4))
    parent_config = json.loads((tmp_path / "v1" / ADAPTER_CONFIG).read_text())
    child_config = json.loads((tmp_path / "v2" / ADAPTER_CONFIG).read_text())
    assert child_config["r"] == parent_config["r"] == 8

    parent_weights = load_file(tmp_path / "v1" / ADAPTER_WEIGHTS)
    child_weights = load_file(tmp_path / "v2" / ADAPTER_WEIGHTS)
    assert parent_weights.keys() == child_weights.keys()
    changed = [k for k in parent_weights if not torch.equal(parent_weights[k], child_weights[k])]
    assert len(changed) == len(parent_weights), "every LoRA matrix should move when training continues"


def test_base_weights_never_change(small_base, tmp_path):
    base_before = {k: v.clone() for k, v in load_base(str(small_base), None, CPU).state_dict().items()}
    model, _ = train_version(small_base, None, tmp_path / "v1", rows(16, seed=3))
    base_after = model.get_base_model().state_dict()
    for name, before in base_before.items():
        key = next(k for k in base_after if k.replace("base_layer.", "") == name or k == name)
        assert torch.equal(before, base_after[key]), f"base weight {name} changed"
    # LoRA B starts at zero in base mode; training must have moved every one of them.
    lora_b = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())


def test_train_candidate_writes_only_the_adapter(small_base, tmp_path):
    plan = assemble_plan(rows(16, 4), rows(0, 0), eval_table(4, 5), eval_table(0, 0), golden=None)
    snapshot = plan.write(tmp_path / "work")
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    steps = []
    record = train_candidate(
        base, CPU, None, None, snapshot, RunConfig(train=FAST), tmp_path / "out", prompt_layout=LATEST_LAYOUT,
        progress=lambda step, total: steps.append((step, total)), show_progress_bar=False,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert record.mode == "base" and record.steps == 2 and record.trainable_parameters > 0
    assert steps[-1] == (2, 2)
