"""Evaluation on a real tiny model: per-example scores of both models on one snapshot, the parent's
scores reused from a cache, the verdict recomputable from the stored table, and a crashed evaluation
that reaches the gate as a reason instead of being lost."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from incremental.config import GatePolicy, LoraSettings
from incremental.dataset import assemble_plan
from incremental.evaluation import evaluate_pair, evidence_from_table
from incremental.gate import decide
from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, ResolvedBase, attach_trainable_adapter, load_base
from incremental.prompting import LATEST_LAYOUT

from conftest import case_table, eval_table

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
POLICY = GatePolicy(generation_rows=3, max_new_tokens=24)


def snapshot_with(tmp_path, *, trusted: int, new: int):
    held_out = pa.concat_tables([eval_table(trusted, 2, True), eval_table(new, 3, False)])
    empty = eval_table(0, 0, False)
    return assemble_plan(case_table(8, 1), case_table(0, 0), held_out, empty, golden=None).write(tmp_path)


@pytest.fixture
def untrained(small_base, tmp_path):
    """An untrained adapter (LoRA B = 0) is the base function: candidate and parent must agree."""
    adapter = attach_trainable_adapter(load_base(str(small_base), None, CPU), None, LoraSettings(), CPU)
    adapter.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_slices_scores_and_cache(small_base, untrained, tmp_path):
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    snapshot = snapshot_with(tmp_path / "data", trusted=10, new=6)
    first = evaluate_pair(base, CPU, untrained, untrained, snapshot, policy=POLICY, max_length=320, prompt_layout=LATEST_LAYOUT)
    table = first.table.to_pylist()
    assert {row["slice"] for row in table} == {"regression", "new"}
    assert {row["metric"] for row in table} >= {"target_nll", "prompt_gain", "artifact_validity", "content_f1"}
    for row in table:  # the same function on both sides: every per-example value agrees
        assert row["candidate"] == pytest.approx(row["parent"], abs=1e-5)
    assert sum(1 for row in table if row["metric"] == "target_nll" and row["slice"] == "regression") == 10
    # Generations: the oldest `generation_rows` judged rows of each artifact type.
    judged_types = [row["artifact_type"] for row in table if row["metric"] == "target_nll" and row["slice"] == "regression"]
    generated_types = [row["artifact_type"] for row in table if row["metric"] == "content_f1"]
    assert {t: generated_types.count(t) for t in set(judged_types)} == {
        t: min(POLICY.generation_rows, judged_types.count(t)) for t in set(judged_types)
    }
    assert len(set(judged_types)) > 1 and len(generated_types) > POLICY.generation_rows

    # The parent's scores from the first run make the second one compute none of them.
    second = evaluate_pair(base, CPU, untrained, untrained, snapshot, policy=POLICY, max_length=320, prompt_layout=LATEST_LAYOUT, parent_cache=first.parent)
    assert first.parent_scored > 0 and second.parent_scored == 0 and second.parent_cached == first.parent_scored
    assert second.table.column("parent").to_pylist() == pytest.approx(first.table.column("parent").to_pylist())

    # The verdict is a function of the stored table: recomputed, it is the same.
    again = evidence_from_table(first.table, snapshot.eval_snapshot_hash, first_version=False)
    assert decide(again, POLICY).verdict is decide(first.evidence, POLICY).verdict
    assert [c.as_record() for c in decide(again, POLICY).checks] == [c.as_record() for c in decide(first.evidence, POLICY).checks]


def test_first_version_is_judged_on_all_rows_against_the_base(small_base, untrained, tmp_path):
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    snapshot = snapshot_with(tmp_path / "data", trusted=0, new=9)
    result = evaluate_pair(base, CPU, untrained, None, snapshot, policy=POLICY, max_length=320, prompt_layout=LATEST_LAYOUT)
    assert set(result.table.column("slice").to_pylist()) == {"all"}
    assert result.evidence.first_version
    values = result.table.column("candidate").to_numpy() - result.table.column("parent").to_numpy()
    assert np.allclose(values, 0.0, atol=1e-5)


def test_crashed_evaluation_rejects_with_the_reason(small_base, tmp_path):
    """The library stage fails closed by itself: no Prefect, no task wrapper needed."""
    from incremental.evaluation import evaluate_candidate
    from incremental.feedback import FeedbackStore

    snapshot = snapshot_with(tmp_path / "data", trusted=0, new=6)
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))
    store = FeedbackStore(tmp_path / "feedback.duckdb")
    store.init()
    evidence = evaluate_candidate(
        base, CPU, model_name="tiny", candidate_dir=tmp_path / "no-such-adapter", candidate_name="v1_20250101_000000",
        parent_name=None, parent_adapter=None, snapshot=snapshot, policy=GatePolicy(), max_length=320, prompt_layout=LATEST_LAYOUT, cache=store,
    )  # fmt: skip
    assert evidence.error is not None
    decision = decide(evidence, GatePolicy())
    assert not decision.accepted and "evaluation failed" in decision.reasons[0] and not decision.blames_batch
