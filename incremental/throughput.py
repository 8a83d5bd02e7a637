"""Training throughput: what the batches held, the model FLOPs of a LoRA step, the device's measured
peak, and MFU (model FLOPs utilization: achieved model FLOP/s over that peak).

Model FLOPs count only the matrix products that real (non-padding) tokens need, so padding, recompute
(activation checkpointing) and 4-bit dequantization show up as a lower MFU, never as more work. The
peak is measured on this machine, not read off a data sheet: a timed matrix product in the dtype the
trainer computes in (float32 on CPU, at torch's thread count; bfloat16 on CUDA), cached in a small JSON
file. Knows nothing about the Trainer, datasets or versions: `training.py` feeds it batches and times.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

__all__ = [
    "PEAK_FILE", "CountingCollator", "LoraFlops", "TokenTally", "measure_matmul_peak", "measured_peak", "mfu", "packed_lengths",
]

log = logging.getLogger("incremental")

PEAK_FILE = "peak.json"  # beside the embedded base's cache folder, e.g. ~/.cache/incremental/peak.json
_PEAK_SCHEMA = 1
_process_peaks: dict[str, float] = {}  # peaks measured in this process when no cache file is given


@dataclass(frozen=True)
class LoraFlops:
    """Model FLOPs of one training step of a LoRA (or QLoRA) model, per real token and per example.

    Per real token: 4 FLOPs per frozen matrix weight (forward 2, gradient w.r.t. activations 2; a
    frozen weight gets no weight gradient) and 6 per trainable one (forward, activation and weight
    gradients: the adapter's A and B). That is the 6N of Kaplan et al. 2020 and PaLM (Chowdhery et
    al. 2022, appendix B) with the weight-gradient third dropped for the frozen base, the "4N" that
    NVIDIA's LoRA figures imply (../shared/reference/performance.md, section 3.2).

    Attention scores and their weighted sum have no weights: PaLM counts 12·L·H·Q·T per token for them
    (forward 4·H·Q per query-key pair and layer, backward twice that, over the full T×T matrix). A
    causal model only needs the pairs at or below the diagonal, T·(T+1)/2 for a sequence of T real
    tokens, so this counts 12·L·H·Q per such pair: per token 12·L·H·Q·(T+1)/2, half of PaLM's term,
    the way FlashAttention's benchmarks count causal attention. H·Q is query heads × head dim (the
    hidden size in Llama; grouped KV heads do not shrink it).
    """

    frozen_params: int  # weights of the frozen matrix products a token passes through, the output head included
    trainable_params: int  # the adapter (every parameter that gets a gradient)
    layers: int
    attention_width: int  # query heads × head dim

    @classmethod
    def of(cls, model) -> LoraFlops:
        """Counted from the model itself: every frozen `nn.Linear` (bitsandbytes' 4-bit and 8-bit layers are
        ones) by its in × out features, whatever its storage; the embedding lookup is no matrix product
        (tied output-head weights are counted once, as the head's product)."""
        frozen = sum(
            module.in_features * module.out_features
            for module in model.modules()
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(frozen, trainable, config.num_hidden_layers, heads * head_dim)

    @property
    def per_token_weights(self) -> int:
        """FLOPs per real token of the products with weights (4 per frozen weight, 6 per trainable one)."""
        return 4 * self.frozen_params + 6 * self.trainable_params

    def per_token(self, length: float) -> float:
        """FLOPs per real token of a sequence of `length` real tokens."""
        return self.per_token_weights + 12 * self.layers * self.attention_width * (length + 1) / 2

    def total(self, tokens: int, attended_pairs: int) -> float:
        """FLOPs of `tokens` real tokens whose sequences hold `attended_pairs` causal query-key pairs
        (T·(T+1)/2 summed over the sequences: `TokenTally` counts both)."""
        return self.per_token_weights * tokens + 12 * self.layers * self.attention_width * attended_pairs


@dataclass
class TokenTally:
    """What the training batches held: real (non-padding) input tokens, padded positions, target
    tokens (labels the loss reads) and causal query-key pairs over the real tokens."""

    batches: int = 0
    tokens: int = 0
    padded: int = 0  # positions in the padded batches, real ones included
    targets: int = 0
    attended_pairs: int = 0

    def add(self, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100) -> None:
        """Count one padded batch from its attention mask (1 on real tokens) and labels."""
        self.add_sequences(attention_mask.sum(dim=-1), attention_mask.numel(), labels, ignore_index)

    def add_sequences(
        self, lengths: torch.Tensor, positions: int, labels: torch.Tensor | None = None, ignore_index: int = -100
    ) -> None:
        """Count one batch of sequences of `lengths` real tokens laid out in `positions` positions (a flattened
        batch: their sum, each sequence attending only to itself)."""
        lengths = lengths.to(torch.int64)
        self.batches += 1
        self.tokens += int(lengths.sum())
        self.padded += positions
        self.attended_pairs += int((lengths * (lengths + 1) // 2).sum())
        if labels is not None:
            self.targets += int((labels != ignore_index).sum())

    @property
    def pad_per_real_token(self) -> float | None:
        return (self.padded - self.tokens) / self.tokens if self.tokens else None


class CountingCollator:
    """A data collator that counts what each batch it builds holds into a `TokenTally`, and changes nothing.

    Batches are counted where the collator builds them (on the CPU, before they reach a device, so no
    GPU synchronisation). The Trainer's data loader may build one batch ahead, so a run that stops in
    the middle of an epoch counts at most one batch more than it trained on.
    """

    def __init__(self, collate: Callable[[list], dict], ignore_index: int = -100):
        self.collate = collate
        self.ignore_index = ignore_index
        self.tally = TokenTally()

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        if mask is not None:
            self.tally.add(mask, batch.get("labels"), self.ignore_index)
        elif "position_ids" in batch:  # flattened: one row of examples whose positions restart at each
            lengths = packed_lengths(batch["position_ids"])
            self.tally.add_sequences(lengths, batch["input_ids"].numel(), batch.get("labels"), self.ignore_index)
        else:  # a collator that does not pad: every position is real
            self.tally.add(torch.ones_like(batch["input_ids"]), batch.get("labels"), self.ignore_index)
        return batch


def packed_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """The lengths of the sequences packed in `position_ids` (batch × positions): a sequence starts wherever a
    position does not follow its predecessor by one (transformers' `find_packed_sequence_indices` rule)."""
    lengths = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]):
        starts = torch.nonzero(torch.diff(row) != 1).flatten() + 1
        edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), row.numel())])
        lengths.append(torch.diff(edges))
    return torch.cat(lengths)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilization: `flops` done in `seconds`, as a share of `peak_flops` (FLOP/s)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu needs positive seconds and peak, got seconds={seconds}, peak_flops={peak_flops}")
    return flops / seconds / peak_flops


def peak_key(device: str) -> str:
    """The cache key of a peak: the processor or GPU's name, the dtype, and on CPU torch's thread count
    (the peak scales with threads; torch keeps one count per thread, so read it where training runs)."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} | bfloat16"
    return f"{_cpu_name()} | float32 | {torch.get_num_threads()} threads"


def measured_peak(
    device: str,
    cache: Path | None = None,
    *,
    measure: Callable[[str], float] | None = None,
) -> float:
    """The device's peak in FLOP/s: from `cache` (a JSON file) when it holds this device's key, else
    measured (`measure`, default `measure_matmul_peak`) and written there. Without `cache` a peak is
    measured once per process and key."""
    key = peak_key(device)
    if cache is None:
        if key not in _process_peaks:
            _process_peaks[key] = (measure or measure_matmul_peak)(device)
        return _process_peaks[key]
    cache = Path(cache).expanduser()
    entry = _read_peaks(cache).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    peak = (measure or measure_matmul_peak)(device)
    record = {"flops": peak, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__}
    try:
        _write_peak(cache, key, record)
    except OSError as exc:  # an unwritable cache costs a measurement next time, never the run
        log.warning("[INCREMENTAL] Could not cache the measured peak in %s: %s", cache, exc)
    else:
        log.info("[INCREMENTAL] Measured this device's peak (%s): %.1f GFLOP/s, cached in %s", key, peak / 1e9, cache)
    return peak


def measure_matmul_peak(device: str, *, size: int | None = None, trials: int = 5) -> float:
    """FLOP/s of the fastest of `trials` timed square matrix products: float32 on CPU at torch's current
    thread count (2048², about 0.2 s a product on one modern core), bfloat16 on CUDA (8192²). The
    fastest trial, since other work on a shared machine only ever slows a trial down."""
    cuda = device == "cuda"
    size = size or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    flops_per_product = 2 * size**3
    repeats = 10 if cuda else 1
    for _ in range(3 if cuda else 1):  # warm-up: kernel selection, clocks, first-touch of memory
        torch.matmul(a, b)
    best = 0.0
    for _ in range(trials):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = max(best, repeats * flops_per_product / (time.perf_counter() - started))
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine() or "cpu"


def _read_peaks(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: measured again and rewritten
        return {}
    peaks = data.get("peaks") if isinstance(data, dict) and data.get("schema") == _PEAK_SCHEMA else None
    return peaks if isinstance(peaks, dict) else {}


def _write_peak(cache: Path, key: str, record: dict) -> None:
    """Merge one entry into the cache file, replaced atomically (a reader never sees half a file; two
    writers at once can lose the other's new entry, which is measured again on its next use)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    peaks = _read_peaks(cache)
    peaks[key] = record
    text = json.dumps({"schema": _PEAK_SCHEMA, "peaks": peaks}, indent=2, sort_keys=True) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{cache.name}.", dir=cache.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, cache)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
