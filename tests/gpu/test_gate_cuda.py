"""The gate's evidence on a real GPU, on the QLoRA path: screening, per-example scoring and greedy
generation of two adapters loaded beside each other on one 4-bit base, and the verdict. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from incremental.config import GatePolicy, LoraSettings, ScreeningPolicy
from incremental.dataset import assemble_plan
from incremental.evaluation import evaluate_pair
from incremental.gate import Verdict, decide
from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, ResolvedBase, attach_trainable_adapter, load_base, load_scoring_model
from incremental.screening import screen_rows
from incremental.prompting import LATEST_LAYOUT

from conftest import case_table, eval_table

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU_4BIT = Hardware(device="cuda", quantization="4bit")
POLICY = GatePolicy(generation_rows=4, max_new_tokens=32)


def test_evidence_and_screening_on_cuda_4bit(small_base, tmp_path):
    # An untrained adapter (LoRA B = 0) is the base function, so candidate and parent must agree.
    adapter = attach_trainable_adapter(load_base(str(small_base), None, GPU_4BIT), None, LoraSettings(r=8, alpha=16), GPU_4BIT)
    adapter.save_pretrained(str(tmp_path / "adapter"))
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    held_out = pa.concat_tables([eval_table(12, 2, trusted=True), eval_table(6, 3, trusted=False)])
    snapshot = assemble_plan(case_table(8, 1), case_table(0, 0), held_out, eval_table(0, 0), golden=None).write(
        tmp_path / "data"
    )
    for parent in (tmp_path / "adapter", None):
        result = evaluate_pair(base, GPU_4BIT, tmp_path / "adapter", parent, snapshot, policy=POLICY, max_length=320, prompt_layout=LATEST_LAYOUT)
        candidate = result.table.column("candidate").to_numpy()
        parent_values = result.table.column("parent").to_numpy()
        assert np.all(np.isfinite(candidate)) and np.all(np.isfinite(parent_values))
        assert np.allclose(candidate, parent_values, atol=2e-3), "identical functions scored differently"
        assert len(result.candidate.generations) == POLICY.generation_rows
        assert decide(result.evidence, POLICY).verdict in (Verdict.ACCEPT, Verdict.INCONCLUSIVE)

    model, tokenizer = load_scoring_model(base, GPU_4BIT, {"parent": tmp_path / "adapter"})
    batch = case_table(10, 4).append_column("source", pa.array(["gpu"] * 10))
    screened = screen_rows(model, tokenizer, batch, eval_table(12, 2, trusted=True), ScreeningPolicy(), max_length=320, prompt_layout=LATEST_LAYOUT)
    assert len(screened.rows) == 10 and all(np.isfinite(row.nll) for row in screened.rows)
