"""Every training run measures its throughput: a real run on the small base returns real tokens/s,
padding and MFU in its TrainingRecord, logs them, and caches the device's peak where it is told."""

from __future__ import annotations

import json
import logging

import pytest

from incremental.config import RunConfig, TrainSettings
from incremental.dataset import assemble_plan, tokenize_train
from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, ResolvedBase, load_tokenizer
from incremental.training import train_candidate
from incremental.prompting import LATEST_LAYOUT

from conftest import case_table as rows
from conftest import eval_table

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")


def test_a_training_run_records_its_throughput(small_base, tmp_path, caplog):
    snapshot = assemble_plan(rows(24, 4), rows(0, 0), eval_table(4, 5), eval_table(0, 0), golden=None).write(tmp_path / "work")
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    config = RunConfig(train=TrainSettings(epochs=2, batch_size=8, learning_rate=5e-3, max_length=320))
    cache = tmp_path / "cache" / "peak.json"
    with caplog.at_level(logging.INFO, logger="incremental"):
        record = train_candidate(
            base, CPU, None, None, snapshot, config, tmp_path / "out", prompt_layout=LATEST_LAYOUT, show_progress_bar=False, peak_cache=cache
        )
    assert record.tokens_per_second > 0
    assert 0 <= record.pad_per_real_token < 1
    assert 0 < record.mfu < 1.5
    assert record.peak_flops > 1e8
    # The counts are of the batches trained on: two whole epochs hold every target token twice.
    dataset, _ = tokenize_train(snapshot.read_train(), load_tokenizer(str(small_base)), 320, prompt_layout=LATEST_LAYOUT)
    assert record.target_tokens == 2 * sum(sum(label != -100 for label in row) for row in dataset["labels"])
    peaks = json.loads(cache.read_text())["peaks"]
    assert [entry["flops"] for entry in peaks.values()] == [pytest.approx(record.peak_flops, abs=1)]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("[INCREMENTAL] Trained"))
    assert f"Trained {record.steps} steps: " in line and "real tokens/s" in line and "MFU" in line
    # The record travels in the manifest: the new fields survive its JSON.
    assert type(record).model_validate_json(record.model_dump_json()) == record
