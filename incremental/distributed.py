"""Training on several processes of one machine (DDP), through torchrun and the same Trainer.

`train_distributed` starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
incremental.distributed JOB`. Every rank loads the base and the parent's adapter, reads the same
dataset snapshot and runs `training.train_candidate`; the Hugging Face Trainer sees torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK), wraps the model in DistributedDataParallel (gloo on CPU,
NCCL on CUDA) and gives each rank its share of the batches. Gradients are averaged every step, so
the ranks' adapters stay identical: `training.train_adapter` compares a digest of every rank's
adapter after training (a difference is an error, not a version) and only rank 0 saves the adapter.
Rank 0 writes the TrainingRecord to a JSON file, which this process reads back; nothing else
crosses the process boundary.

Past one machine: torchrun's `--nnodes`/`--rdzv-endpoint` form (README, "Train on several GPUs").
A model that does not fit one GPU needs FSDP (accelerate's FSDP plugin), which this project does not
configure: QLoRA fits a 7B base on one 24 GB GPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from incremental.config import RunConfig
from incremental.errors import ConfigurationError, IncrementalError
from incremental.manifest import BaseModelRef, TrainingRecord

log = logging.getLogger("incremental")

OUTPUT_TAIL_LINES = 40  # what a failed launch shows of its ranks' output


class DistributedTrainingError(IncrementalError):
    """A rank of a multi-process training failed; nothing was saved."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs, as JSON: the base, the device, the parent, the snapshot, the config."""

    base_id: str
    base_revision: str | None
    base_source: str
    device: str
    quantization: str
    parent_name: str | None
    parent_adapter: str | None
    prompt_layout: int  # the lineage's prompt layout
    snapshot: dict  # dataset.DatasetSnapshot's fields
    config: dict  # RunConfig, as JSON
    output_dir: str
    peak_cache: str | None
    threads_per_rank: int
    result_path: str


def check_processes(processes: int, device: str) -> None:
    """A clear error before anything starts when the machine cannot run `processes` ranks."""
    if processes < 1:
        raise ConfigurationError(f"INCREMENTAL_TRAIN_PROCESSES={processes}: use 1 (one process) or more")
    if device == "cuda":
        import torch

        available = torch.cuda.device_count()
        if processes > available:
            raise ConfigurationError(
                f"INCREMENTAL_TRAIN_PROCESSES={processes}: this machine has {available} CUDA device(s); "
                "use at most one process per GPU"
            )


def train_distributed(
    base,
    hardware,
    parent_name: str | None,
    parent_adapter: Path | None,
    snapshot,
    config: RunConfig,
    output_dir: Path,
    *,
    prompt_layout: int,
    processes: int,
    threads: int,
    peak_cache: Path | None = None,
) -> TrainingRecord:
    """`training.train_candidate` on `processes` ranks (DDP); returns rank 0's TrainingRecord, whose
    throughput counts the tokens of every rank. `threads`: the CPU threads of the whole training,
    shared out between the ranks. Raises DistributedTrainingError with the ranks' last lines when a
    rank fails; the output folder then holds no adapter."""
    check_processes(processes, hardware.device)
    with tempfile.TemporaryDirectory(prefix="incremental-ddp-") as scratch:
        job = TrainJob(
            base_id=base.ref.id, base_revision=base.ref.revision, base_source=base.source,
            device=hardware.device, quantization=hardware.quantization,
            parent_name=parent_name, parent_adapter=None if parent_adapter is None else str(parent_adapter),
            prompt_layout=prompt_layout,
            snapshot={key: str(value) if isinstance(value, Path) else value for key, value in asdict(snapshot).items()},
            config=config.model_dump(mode="json"), output_dir=str(output_dir),
            peak_cache=None if peak_cache is None else str(peak_cache),
            threads_per_rank=max(1, threads // processes), result_path=str(Path(scratch) / "result.json"),
        )  # fmt: skip
        job_path = Path(scratch) / "job.json"
        job_path.write_text(json.dumps(asdict(job)), encoding="utf-8")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "incremental.distributed", str(job_path),
        ]  # fmt: skip
        log.info("[INCREMENTAL] Training on %d processes (DDP, %s): %s", processes, _backend(hardware.device), " ".join(command[1:]))
        environment = {**os.environ, "OMP_NUM_THREADS": str(job.threads_per_rank), "INCREMENTAL_THREADS": str(job.threads_per_rank)}
        tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        with subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as ranks:
            assert ranks.stdout is not None
            for line in ranks.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if line.startswith("[INCREMENTAL]"):
                    log.info("%s", line)  # rank 0's progress lines, into the run's logs
            code = ranks.wait()
        result = Path(job.result_path)
        if code != 0 or not result.is_file():
            shown = "\n".join(tail)
            raise DistributedTrainingError(
                f"training on {processes} processes failed (torchrun exit code {code}); its last lines:\n{shown}"
            )
        return TrainingRecord.model_validate_json(result.read_text(encoding="utf-8"))


def _backend(device: str) -> str:
    return "NCCL" if device == "cuda" else "gloo"


def _run_rank(job_path: Path) -> None:
    """One rank, as torchrun starts it: train, and on rank 0 write the record."""
    from incremental.dataset import DatasetSnapshot
    from incremental.modeling import Hardware, ResolvedBase
    from incremental.training import train_candidate

    import torch

    job = TrainJob(**json.loads(job_path.read_text(encoding="utf-8")))
    torch.set_num_threads(job.threads_per_rank)
    rank = int(os.environ.get("RANK", "0"))
    # Only rank 0 speaks: the other ranks' log lines would repeat it N times.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout)
    for noisy in ("httpx", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    snapshot = DatasetSnapshot(
        **{key: tuple(value) if isinstance(value, list) else value for key, value in job.snapshot.items()}
        | {"work_dir": Path(job.snapshot["work_dir"])}
    )
    record = train_candidate(
        ResolvedBase(BaseModelRef(id=job.base_id, revision=job.base_revision), job.base_source),
        Hardware(device=job.device, quantization=job.quantization),
        job.parent_name,
        None if job.parent_adapter is None else Path(job.parent_adapter),
        snapshot,
        RunConfig.model_validate(job.config),
        Path(job.output_dir),
        prompt_layout=job.prompt_layout,
        show_progress_bar=False,
        peak_cache=None if job.peak_cache is None else Path(job.peak_cache),
    )
    if rank == 0:
        Path(job.result_path).write_text(record.model_dump_json(), encoding="utf-8")


def _main() -> None:
    # `record` writes a failing rank's exception where torchrun reads it: its summary then names the
    # error (the "Root Cause" section) instead of only the exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_run_rank)(Path(sys.argv[1]))


if __name__ == "__main__":
    _main()
