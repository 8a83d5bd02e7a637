"""Training on several processes (DDP through torchrun, gloo on CPU): two real ranks train one candidate.

The ranks end with identical adapters (each reports a digest of its own), only rank 0 writes the
adapter, the throughput counts both ranks' tokens, and the `retrain` flow's train task launches it
when INCREMENTAL_TRAIN_PROCESSES is 2. A failing rank fails the training with its output.
"""

from __future__ import annotations

import pytest
from conftest import case_table as rows
from conftest import eval_table

from incremental.config import LoraSettings, RunConfig, TrainSettings
from incremental.dataset import assemble_plan
from incremental.distributed import DistributedTrainingError, train_distributed
from incremental.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, ResolvedBase, attach_trainable_adapter, load_base
from incremental.training import adapter_digest, train_candidate
from incremental.prompting import LATEST_LAYOUT

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
CONFIG = RunConfig(train=TrainSettings(epochs=1, batch_size=4, learning_rate=5e-3, max_length=320))


def test_two_ranks_train_one_adapter_and_rank_0_alone_writes_it(small_base, tmp_path):
    plan = assemble_plan(rows(24, 4), rows(0, 0), eval_table(4, 5), eval_table(0, 0), golden=None)
    snapshot = plan.write(tmp_path / "work")
    base = ResolvedBase(BaseModelRef(id=str(small_base)), str(small_base))

    record = train_distributed(base, CPU, None, None, snapshot, CONFIG, tmp_path / "ddp", prompt_layout=LATEST_LAYOUT, processes=2, threads=2)

    assert record.processes == 2 and [rank["rank"] for rank in record.ranks] == [0, 1]
    assert [rank["saved"] for rank in record.ranks] == [True, False]
    digests = {rank["adapter_sha256"] for rank in record.ranks}
    assert len(digests) == 1, record.ranks
    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    # What rank 0 saved is what every rank held.
    saved = attach_trainable_adapter(load_base(str(small_base), None, CPU), tmp_path / "ddp", LoraSettings(), CPU)
    assert adapter_digest(saved) == digests.pop()

    # Each rank took half the batches of an epoch: 24 rows in batches of 4 per rank is 3 optimizer steps,
    # and the throughput counts both ranks' tokens (the same tokens one process trains on).
    single = train_candidate(base, CPU, None, None, snapshot, CONFIG, tmp_path / "one", prompt_layout=LATEST_LAYOUT, show_progress_bar=False)
    assert (record.steps, single.steps) == (3, 6)
    assert record.target_tokens == single.target_tokens and record.tokens_per_second > 0


def test_a_failing_rank_fails_the_training_with_its_output(small_base, tmp_path):
    plan = assemble_plan(rows(8, 4), rows(0, 0), eval_table(4, 5), eval_table(0, 0), golden=None)
    snapshot = plan.write(tmp_path / "work")
    missing = ResolvedBase(BaseModelRef(id=str(tmp_path / "no-base")), str(tmp_path / "no-base"))
    with pytest.raises(DistributedTrainingError, match=r"(?s)training on 2 processes failed \(torchrun exit code 1\).*no-base"):
        train_distributed(missing, CPU, None, None, snapshot, CONFIG, tmp_path / "ddp", prompt_layout=LATEST_LAYOUT, processes=2, threads=2)
    assert not (tmp_path / "ddp").exists() or not any((tmp_path / "ddp").iterdir())


def test_the_flow_trains_on_two_processes_when_asked(prefect_api, env, env_store, monkeypatch):
    from flows.retrain import retrain

    from incremental.registry import Registry
    from incremental.synthetic import synthetic_feedback

    monkeypatch.setenv("INCREMENTAL_TRAIN_PROCESSES", "2")
    env_store.add_many(synthetic_feedback(40, 1, model="tiny"))
    summary = retrain(model="tiny", config=CONFIG)
    assert summary.version is not None, summary.reasons
    training = Registry(env.models_root, "tiny").get(summary.version).manifest.training
    assert training.processes == 2 and len({rank["adapter_sha256"] for rank in training.ranks}) == 1
