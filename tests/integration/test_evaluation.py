"""Evaluation on a real tiny model: same snapshot for both, metrics from the shipped evaluate
modules, and a crashed evaluation that reaches the gate as a reason instead of being lost."""

from __future__ import annotations

import math

import pytest

from incremental.config import GatePolicy, RunConfig
from incremental.dataset import plan_dataset
from incremental.evaluation import load_metric
from incremental.gate import decide
from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, ResolvedBase

from conftest import case_table as table

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")


def test_metric_modules_load_offline_and_weight_by_tokens():
    nll = load_metric("target_nll").compute(nll_sum=[2.0, 10.0], n_tokens=[1, 9])
    assert nll["target_nll"] == pytest.approx(12.0 / 10)  # not the mean of 2.0 and 1.11
    gain = load_metric("prompt_gain").compute(
        own_nll_sum=[1.0, 9.0], own_tokens=[1, 9], other_nll_sum=[3.0, 18.0], other_tokens=[1, 9]
    )
    assert gain["prompt_gain"] == pytest.approx(((3 - 1) * 1 + (2 - 1) * 9) / 10)


def test_crashed_evaluation_rejects_with_the_reason(small_base, tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.evaluation import evaluate_candidate
    from tasks.registry import Parent

    snapshot = plan_dataset(table(8, 1), table(0, 0), table(6, 2), table(0, 0), RunConfig().data, seed=0).write(tmp_path)
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    parent = Parent(name=None, adapter_dir=None, lineage=(), base=None)
    from incremental.settings import Settings

    with disable_run_logger():
        candidate, parent_scores = evaluate_candidate.fn(
            Settings(device="cpu"), base, tmp_path / "no-such-adapter", parent, snapshot, RunConfig()
        )
    assert candidate.error is not None
    decision = decide(candidate, parent_scores, GatePolicy())
    assert not decision.accepted and "evaluation failed" in decision.reasons[0]


def test_base_as_parent_scores_same_snapshot(small_base, tmp_path):
    from incremental.evaluation import evaluate_pair
    from incremental.modeling import attach_trainable_adapter, load_base
    from incremental.config import LoraSettings

    snapshot = plan_dataset(table(8, 1), table(0, 0), table(6, 2), table(0, 0), RunConfig().data, seed=0).write(tmp_path)
    # An untrained adapter (LoRA B = 0) is the base function: candidate and parent must agree.
    untrained = attach_trainable_adapter(load_base(str(small_base), None, CPU), None, LoraSettings(), CPU)
    untrained.save_pretrained(str(tmp_path / "adapter"))
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    candidate, parent = evaluate_pair(base, CPU, tmp_path / "adapter", None, snapshot, max_length=320)
    assert candidate.snapshot_hash == parent.snapshot_hash == snapshot.eval_snapshot_hash
    assert candidate.n_examples == parent.n_examples == 6
    for metric in ("target_nll", "prompt_gain"):
        assert math.isfinite(candidate.metrics[metric])
        assert candidate.metrics[metric] == pytest.approx(parent.metrics[metric], abs=1e-5)
