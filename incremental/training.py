"""Train the candidate of a run: continue the parent's LoRA adapter (or start one in base mode) on
the run's train split, with the Hugging Face Trainer, and save it as safetensors.

Knows nothing about feedback, gates or the registry: it receives the parent's adapter folder (or
None), the dataset snapshot and the settings, and writes `adapter_model.safetensors` and
`adapter_config.json` into an output folder. Each run starts a fresh optimizer and schedule
(continue, not resume: the parent's optimizer state belongs to the parent's data). Every run
measures its throughput (real tokens/s, padding, MFU against the device's measured peak; see
`throughput.py`), logs it and returns it in the TrainingRecord. `train_adapter` needs only torch,
transformers and pydantic: loading models and reading snapshots is imported by `train_candidate`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from incremental.batching import BatchingTrainer, plan_batching
from incremental.config import RunConfig, TrainSettings
from incremental.errors import IncrementalError
from incremental.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from incremental.manifest import TrainingRecord
from incremental.throughput import CountingCollator, LoraFlops, TokenTally, measured_peak, mfu

if TYPE_CHECKING:
    from incremental.dataset import DatasetSnapshot
    from incremental.modeling import Hardware, ResolvedBase

log = logging.getLogger("incremental")

ProgressFn = Callable[[int, int], None]  # (optimizer step, total steps)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    batching: str  # the mode the batches were built by (batching.py), resolved for the device
    train_loss: float | None
    target_tokens: int
    wall_seconds: float
    train_seconds: float  # `Trainer.train` alone: what the throughput figures divide by
    real_tokens: int  # input tokens that were not padding, over the whole run
    tokens_per_second: float  # real tokens / train_seconds
    pad_per_real_token: float | None  # padded positions per real token (0: no padding)
    flops: float  # model FLOPs of the run (throughput.LoraFlops)
    peak_flops: float  # the device's measured peak, FLOP/s
    mfu: float  # flops / train_seconds / (peak_flops x processes)
    ranks: tuple[dict, ...] = ()  # under DDP, each rank: its number, adapter digest, whether it saved


def train_candidate(
    base: ResolvedBase,
    hardware: Hardware,
    parent_name: str | None,
    parent_adapter: Path | None,
    snapshot: DatasetSnapshot,
    config: RunConfig,
    output_dir: Path,
    *,
    prompt_layout: int,
    progress: ProgressFn | None = None,
    show_progress_bar: bool = True,
    peak_cache: Path | None = None,
) -> TrainingRecord:
    """Load base (+ parent adapter, trainable), train on the snapshot's train split, save the adapter.

    `prompt_layout`: the prompt layout of the lineage (the parent's; the latest for a first version).

    `peak_cache`: the JSON file that keeps the device's measured peak between processes (see
    `train_adapter`)."""
    from incremental.dataset import tokenize_train
    from incremental.modeling import attach_trainable_adapter, count_trainable, load_base, load_tokenizer, name_base_in_adapter

    started = time.perf_counter()
    if parent_adapter is None:
        log.info("[INCREMENTAL] Loading base model (no previous fine-tuning found)")
    else:
        log.info("[INCREMENTAL] Loading previous fine-tuned model: %s", parent_name)
    tokenizer = load_tokenizer(base.source, base.load_revision)
    model = attach_trainable_adapter(
        load_base(base.source, base.load_revision, hardware), parent_adapter, config.lora, hardware,
        gradient_checkpointing=config.train.gradient_checkpointing,
    )  # fmt: skip
    # The saved adapter_config.json names the base by its id, not this machine's path to it, so the
    # version folder loads with plain PEFT elsewhere (the registry hashes the file as saved).
    name_base_in_adapter(model, base)
    if parent_adapter is not None:
        log.info("[INCREMENTAL] ✅ Successfully loaded fine-tuned model! Continuing %s", parent_name)
    dataset, n_truncated = tokenize_train(snapshot.read_train(), tokenizer, config.train.max_length, prompt_layout=prompt_layout)
    result = train_adapter(
        model,
        tokenizer,
        dataset,
        config.train,
        output_dir,
        device=hardware.device,
        progress=progress,
        show_progress_bar=show_progress_bar,
        peak_cache=peak_cache,
    )
    return TrainingRecord(
        mode="base" if parent_adapter is None else "incremental",
        device=hardware.device,
        quantization=hardware.quantization,
        steps=result.steps,
        epochs=config.train.epochs,
        train_loss=result.train_loss,
        trainable_parameters=count_trainable(model),
        target_tokens=result.target_tokens,
        wall_seconds=round(time.perf_counter() - started, 3),
        n_truncated=n_truncated,
        tokens_per_second=round(result.tokens_per_second, 1),
        pad_per_real_token=None if result.pad_per_real_token is None else round(result.pad_per_real_token, 4),
        mfu=round(result.mfu, 4),
        peak_flops=round(result.peak_flops),
        batching=result.batching,
        processes=max(1, len(result.ranks)),
        ranks=result.ranks,
    )


class _ReportProgress(TrainerCallback):
    """Progress while training, for people watching a run: a log line at each logging step (step, loss,
    real tokens/s so far, ETA) that the flow sends to the Prefect run's logs, and every optimizer step to
    `progress` (the Prefect task turns it into a progress artifact)."""

    def __init__(self, progress: ProgressFn | None, tally: TokenTally):
        self.progress = progress
        self.tally = tally  # what the batches built so far held (the collator counts them)
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.max_steps:
            return
        elapsed = time.perf_counter() - self.started
        done = state.global_step / state.max_steps
        tokens_per_s = self.tally.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        log.info(
            "[INCREMENTAL] step %d/%d loss %.4f, %.0f tokens/s, ETA %s",
            state.global_step, state.max_steps, logs["loss"], tokens_per_s, _duration(eta),
        )  # fmt: skip


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def train_adapter(
    model,
    tokenizer,
    dataset,
    settings: TrainSettings,
    output_dir: Path,
    *,
    device: str,
    progress: ProgressFn | None = None,
    show_progress_bar: bool = True,
    peak_cache: Path | None = None,
) -> TrainResult:
    """Train `model`'s trainable adapter on a tokenized dataset and save only the adapter files.

    Throughput is measured over `Trainer.train` alone (model loading and saving excluded): the real
    tokens the batches held (counted by the collator), their padding, and the model FLOPs they needed
    against the device's peak, measured once and kept in `peak_cache` (a JSON file; None keeps it for
    this process only).
    """
    started = time.perf_counter()
    lengths = [len(row["input_ids"]) for row in dataset]  # a `datasets.Dataset` or a list of rows
    batching = plan_batching(settings, tokenizer, lengths, model.config, device)
    log.info("[INCREMENTAL] Batching: %s", batching.describe())
    steps_per_epoch = math.ceil(batching.batches_per_epoch / settings.gradient_accumulation_steps)
    total_steps = math.ceil(steps_per_epoch * settings.epochs)
    # Prompt tokens (dataset.IGNORE_INDEX) and padding carry the label the loss ignores: -100, by
    # transformers' convention, in every collator batching.py builds.
    counting = CountingCollator(batching.collate, ignore_index=-100)
    flops_model = LoraFlops.of(model)
    peak = measured_peak(device, peak_cache)  # before the clock starts; in this thread (torch's thread count is per thread)
    with tempfile.TemporaryDirectory(prefix="incremental-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,  # the Trainer wants one; nothing is checkpointed mid-run
            save_strategy="no",
            report_to="none",
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            learning_rate=settings.learning_rate,
            num_train_epochs=settings.epochs,
            warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of the steps
            lr_scheduler_type="linear",
            weight_decay=settings.weight_decay,
            # About ten loss lines per run in the logs (and the Prefect UI), whatever its length.
            logging_steps=max(1, total_steps // 10),
            seed=settings.seed,
            data_seed=settings.seed,
            use_cpu=device == "cpu",
            bf16=device == "cuda",
            train_sampling_strategy=batching.sampling_strategy,  # where the Trainer samples (batching.py)
            dataloader_num_workers=0,
            disable_tqdm=not show_progress_bar,
        )
        trainer = BatchingTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=counting,
            callbacks=[_ReportProgress(progress, counting.tally)],
            batching=batching,
        )
        # Without a progress bar the Trainer adds PrinterCallback, which print()s every log dict
        # ({'loss': ..., 'grad_norm': ...}) to stdout, where no log filter reaches it; `_ReportProgress`
        # already logs the same numbers as `[INCREMENTAL]` lines.
        trainer.remove_callback(PrinterCallback)
        train_started = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - train_started
    # Under DDP (torchrun, see distributed.py) every rank holds the same adapter; only rank 0 writes it.
    saves = trainer.is_world_process_zero()
    if saves:
        # save_embedding_layers=False: training never resizes the vocabulary, and "auto" would look the
        # base up by the adapter config's portable name, on the hub for `embedded/<hash>`.
        model.save_pretrained(str(output_dir), safe_serialization=True, save_embedding_layers=False)
        # PEFT also writes a model-card README; a version folder holds the adapter and manifest only.
        for extra in output_dir.iterdir():
            if extra.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                extra.unlink()
    tally, ranks = counting.tally, ()
    if args.world_size > 1:
        tally, ranks = _across_ranks(model, tally, saves)
    flops = flops_model.total(tally.tokens, tally.attended_pairs)
    result = TrainResult(
        steps=output.global_step,
        batching=batching.mode,
        train_loss=_finite(output.training_loss),
        target_tokens=tally.targets,
        wall_seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        real_tokens=tally.tokens,
        tokens_per_second=tally.tokens / train_seconds,
        pad_per_real_token=tally.pad_per_real_token,
        flops=flops,
        peak_flops=peak,
        mfu=mfu(flops, train_seconds, peak * max(1, len(ranks))),
        ranks=ranks,
    )
    log.info(
        "[INCREMENTAL] Trained %d steps: %.0f real tokens/s, %.2f pad tokens per real token, "
        "MFU %.1f%% of a measured peak of %.1f GFLOP/s",
        result.steps, result.tokens_per_second, result.pad_per_real_token or 0.0, 100 * result.mfu, peak / 1e9,
    )  # fmt: skip
    return result


class RanksDivergedError(IncrementalError):
    """Under DDP, the ranks ended training with different adapters (they must not: gradients are averaged)."""


def _across_ranks(model, tally: TokenTally, saved: bool) -> tuple[TokenTally, tuple[dict, ...]]:
    """Under DDP: the tally of every rank's batches (throughput counts the whole training), and each
    rank's adapter digest and whether it saved. Gradients are averaged every step, so the adapters must
    be identical; a rank that differs is an error, never a version."""
    import torch.distributed as dist

    mine = {
        "rank": dist.get_rank(),
        "adapter_sha256": adapter_digest(model),
        "saved": saved,
        "tally": (tally.batches, tally.tokens, tally.padded, tally.targets, tally.attended_pairs),
    }
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, mine)
    digests = {rank["adapter_sha256"] for rank in gathered}
    if len(digests) != 1:
        raise RanksDivergedError(
            f"the {len(gathered)} ranks hold different adapters after training ({sorted(digests)}); nothing becomes a version"
        )
    total = TokenTally(*(sum(rank["tally"][i] for rank in gathered) for i in range(5)))
    log.info("[INCREMENTAL] The %d ranks hold identical adapters (sha256 %s); rank 0 saved it", len(gathered), digests.pop()[:12])
    return total, tuple({key: rank[key] for key in ("rank", "adapter_sha256", "saved")} for rank in gathered)


def adapter_digest(model) -> str:
    """sha256 over the trainable (adapter) tensors, by name: equal digests, equal adapters."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
