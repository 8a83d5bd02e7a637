"""Load a base model and put a LoRA adapter on it: a new one (base mode), the parent's to continue
training (incremental mode), or several named ones to score side by side.

On CUDA the base loads in 4-bit NF4 through bitsandbytes (QLoRA) by default; on CPU in float32,
since bfloat16 matrix products are hundreds of times slower on common CPUs (4-bit on CPU computes in
float32 too). A device or quantization this machine cannot run, or a base that ships quantized in
another format, is refused naming the setting before any model loads. A local base folder whose
file hashes were recorded (the embedded base) is checked before it is loaded, and an adapter whose
tensors do not fit the base is refused. Knows nothing about versions or the registry: callers
pass adapter folders (checked by the registry).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import is_flash_attn_2_available

from incremental import layout
from incremental.config import LoraSettings
from incremental.embedded import check_base_files
from incremental.errors import ConfigurationError
from incremental.manifest import BaseModelRef
from incremental.settings import EMBEDDED_BASE, Settings

log = logging.getLogger("incremental")

# peft 0.21 still reads transformers' renamed `is_gradient_checkpointing`; the warning is for
# peft's maintainers, not for someone running a retrain. Drop this when peft is updated.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Hardware:
    """Where and how the base model runs."""

    device: str  # "cpu" | "cuda"
    quantization: str  # "4bit" | "none"

    @classmethod
    def from_settings(cls, settings: Settings) -> "Hardware":
        """The settings' device and quantization; ConfigurationError if this machine cannot run them."""
        hardware = cls(device=settings.resolved_device(), quantization="4bit" if settings.use_4bit() else "none")
        check_hardware(hardware)
        return hardware


def check_hardware(hardware: Hardware) -> None:
    """Refuse a device or quantization this machine cannot run, naming the setting and the fix.

    Cheap (no model is read), so entry points call it before anything loads or trains.
    """
    if hardware.device == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else f"torch (CUDA {torch.version.cuda}) finds no usable GPU"
        )
        raise ConfigurationError(
            f"INCREMENTAL_DEVICE=cuda, but {why}; set INCREMENTAL_DEVICE=cpu (or auto, which picks CUDA only when "
            "torch finds a GPU), or run on a GPU machine with a CUDA build of torch installed first"
        )
    if hardware.quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401  (peft imports it when present; here only its absence matters)
        except ImportError as exc:
            raise ConfigurationError(
                f"INCREMENTAL_QUANTIZATION=4bit (also what auto means on CUDA) loads the base through bitsandbytes, which "
                f"cannot be imported ({exc}); install it (pip install 'bitsandbytes>=0.50.2,<0.51') or set "
                "INCREMENTAL_QUANTIZATION=none to load the base unquantized"
            ) from exc


def check_base_fits(source: str, revision: str | None, hardware: Hardware) -> None:
    """Refuse a base whose config says it ships quantized in a form this loading cannot use.

    4-bit here means bitsandbytes quantizing full-precision weights to NF4 as they load; a release
    stored in 4-bit bitsandbytes fits that too. Any other stored quantization (GPTQ, AWQ, 8-bit...)
    would be kept by transformers in place of the one asked for, so the run would train and record
    something else than its settings say. Reads only the base's config.
    """
    shipped = getattr(AutoConfig.from_pretrained(source, revision=revision), "quantization_config", None)
    if not shipped:
        return
    shipped = shipped if isinstance(shipped, dict) else shipped.to_dict()
    method = str(shipped.get("quant_method", "unknown"))
    bnb_4bit = method == "bitsandbytes" and bool(shipped.get("load_in_4bit"))
    if bnb_4bit and hardware.quantization == "4bit":
        return
    form = ("bitsandbytes 4-bit" if bnb_4bit else "bitsandbytes 8-bit") if method == "bitsandbytes" else method
    if bnb_4bit:  # and quantization none
        fix = "set INCREMENTAL_QUANTIZATION=4bit to load it as stored, or use the model's full-precision release"
    else:
        fix = (
            "use the model's full-precision release as INCREMENTAL_BASE_MODEL (4bit then quantizes it to NF4 as it "
            "loads, none loads it unquantized), or a bitsandbytes 4-bit release with INCREMENTAL_QUANTIZATION=4bit"
        )
    raise ConfigurationError(
        f"the base model {source} is stored quantized as {form}, which INCREMENTAL_QUANTIZATION="
        f"{hardware.quantization} cannot load as asked; {fix}"
    )


@dataclass(frozen=True)
class ResolvedBase:
    """A base model's identity (recorded in manifests) and where to load it from."""

    ref: BaseModelRef
    source: str  # hub id or local folder

    @property
    def load_revision(self) -> str | None:
        """The hub revision to pass to from_pretrained; a local or embedded folder takes none."""
        return self.ref.revision if self.ref.id == self.source else None


def resolve_base(settings: Settings) -> ResolvedBase:
    """The base model named by the settings, building the embedded one on first use.

    The embedded base is identified by the hash of its spec (its cache folder's name), so a
    manifest names exactly which tiny model its adapter belongs to.
    """
    if settings.base_model == EMBEDDED_BASE:
        from incremental.embedded import EmbeddedBaseSpec, ensure_embedded_base

        spec = EmbeddedBaseSpec(invented_name_share=settings.embedded_invented_name_share)
        path = ensure_embedded_base(settings.embedded_cache_dir, spec)
        return ResolvedBase(BaseModelRef(id=EMBEDDED_BASE, revision=path.name), str(path))
    return ResolvedBase(BaseModelRef(id=settings.base_model, revision=settings.base_model_revision), settings.base_model)


def locate_base(ref: BaseModelRef, settings: Settings) -> ResolvedBase:
    """Where to load the base a manifest names (serving resolves the base from the tree alone)."""
    if ref.id != EMBEDDED_BASE:
        return ResolvedBase(ref, ref.id)
    cached = settings.embedded_cache_dir / (ref.revision or "")
    if ref.revision and cached.is_dir():
        return ResolvedBase(ref, str(cached))
    built = resolve_base(settings.model_copy(update={"base_model": EMBEDDED_BASE}))
    if built.ref.revision != ref.revision:
        raise ConfigurationError(
            f"the embedded base {ref.revision} is not in {settings.embedded_cache_dir} and this release builds "
            f"{built.ref.revision}; point INCREMENTAL_EMBEDDED_CACHE_DIR at the cache that holds it"
        )
    return built


def adapter_base_reference(base: ResolvedBase) -> tuple[str, str | None]:
    """How a saved adapter names its base: (`base_model_name_or_path`, `revision`) of its adapter_config.json.

    Plain PEFT (`AutoPeftModelForCausalLM.from_pretrained(version_folder)`, TGI, LoRAX) reads these,
    so they must hold on any machine the folder is copied to, never this machine's cache path: a hub
    base is its id and pinned revision; the embedded base is `embedded/<hash>`, a path relative to the
    folder that holds the embedded cache (`~/.cache/incremental` for the default
    INCREMENTAL_EMBEDDED_CACHE_DIR); a local folder base is the path as configured. Loading in this
    project never reads them: it takes the base from the version's manifest.
    """
    if base.ref.id == EMBEDDED_BASE:
        return f"{EMBEDDED_BASE}/{base.ref.revision}", None
    return base.ref.id, base.load_revision


def name_base_in_adapter(model: PeftModel, base: ResolvedBase) -> None:
    """Make `model`'s adapter configs name `base` portably (see `adapter_base_reference`) before it is saved."""
    name, revision = adapter_base_reference(base)
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
        config.revision = revision


def resolve_base_for(settings: Settings, parent_name: str | None, parent_base: BaseModelRef | None) -> ResolvedBase:
    """The base named by the settings (built on first use if embedded), refused unless it is the
    parent's (an adapter only continues on the base it was trained on) and unless the device and
    quantization the settings ask for fit this machine and this base."""
    hardware = Hardware.from_settings(settings)  # before an embedded base is built: that trains a model
    base = resolve_base(settings)
    if parent_name is not None and parent_base is not None:
        check_same_base(parent_base, base.ref, parent_name)
    check_base_fits(base.source, base.load_revision, hardware)
    return base


def check_same_base(parent_base: BaseModelRef, current: BaseModelRef, parent_name: str) -> None:
    """An adapter only fits the exact base it was trained on; refuse a mismatch before training."""
    if (parent_base.id, parent_base.revision) != (current.id, current.revision):
        if parent_base.id == current.id == EMBEDDED_BASE:
            raise ConfigurationError(
                f"{parent_name} was trained on the embedded base {parent_base.revision}, but these settings build "
                f"{current.revision}. Set INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE back to what the lineage was trained "
                "with, or train under a new model name."
            )
        raise ConfigurationError(
            f"{parent_name} was trained on base model {parent_base.id!r} (revision {parent_base.revision}), "
            f"but the settings name {current.id!r} (revision {current.revision}). Set INCREMENTAL_BASE_MODEL "
            "(and INCREMENTAL_BASE_MODEL_REVISION) to the parent's base, or train under a new model name."
        )


def _check_local_base(source: str) -> None:
    """A local base folder with recorded file hashes must still match them (see `check_base_files`)."""
    if Path(source).is_dir():
        check_base_files(Path(source))


def load_tokenizer(source: str, revision: str | None = None):
    _check_local_base(source)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token_id is None:
        # Llama-family tokenizers ship without a pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(source: str, revision: str | None, hardware: Hardware):
    """The base model, frozen, on the chosen device."""
    _check_local_base(source)
    check_hardware(hardware)
    check_base_fits(source, revision, hardware)
    kwargs: dict = {"revision": revision}
    if hardware.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if hardware.device == "cuda" else torch.float32,
        )
        kwargs["device_map"] = {"": _local_gpu()} if hardware.device == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = torch.bfloat16 if hardware.device == "cuda" else torch.float32
    if hardware.device == "cuda" and is_flash_attn_2_available():
        # FlashAttention's variable-length kernel: `TrainSettings.batching="auto"` then trains on
        # flattened batches (batching.py). Without the flash-attn package, transformers' default (SDPA).
        kwargs["attn_implementation"] = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if hardware.quantization != "4bit":
        model.to(f"cuda:{_local_gpu()}" if hardware.device == "cuda" else hardware.device)
    model.config.use_cache = False  # training and loss-only scoring never reuse a KV cache
    return model


def _local_gpu() -> int:
    """The GPU of this process: torchrun's LOCAL_RANK under DDP (distributed.py), one rank per GPU; else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def attach_trainable_adapter(
    base, parent_adapter: Path | None, lora: LoraSettings, hardware: Hardware, *, gradient_checkpointing: bool = False
) -> PeftModel:
    """Base mode: a fresh LoRA adapter. Incremental mode: the parent's adapter, trainable.

    Continuing keeps the parent's adapter config (rank, targets): its weights only fit that shape,
    so `lora` applies to new adapters alone. The optimizer is always fresh (see training.py).
    `gradient_checkpointing` (TrainSettings) recomputes each decoder layer's activations in the
    backward pass instead of keeping them; QLoRA on CUDA always does, as the QLoRA recipe does.
    """
    if hardware.quantization == "4bit":
        # PEFT freezes the base and casts its non-4-bit parameters to float32. Its own checkpointing
        # switch calls transformers' deprecated name (a warning every run), so it is off here.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if hardware.device == "cpu":
            _keep_trainable_on_cpu(base)
    if gradient_checkpointing or (hardware.device == "cuda" and hardware.quantization == "4bit"):
        # transformers 5's call (it also makes the embeddings' output require grad, which the
        # reentrant variant needs for gradients to reach LoRA layers behind a frozen base).
        # use_reentrant=False: torch is removing the reentrant default.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if parent_adapter is None:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    else:
        model = load_adapter(base, parent_adapter, is_trainable=True)
    if count_trainable(model) == 0:
        raise RuntimeError("the adapter has no trainable parameters; it was loaded frozen")
    return model


def _keep_trainable_on_cpu(base) -> None:
    """Keep a 4-bit model that will train off bitsandbytes' CPU inference kernel.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's weight for a faster kernel
    the first time the layer runs in eval mode without gradients, and keeps it repacked. That kernel
    has no backward: a training step after any evaluation of the model gets no gradient through the
    base layers (measured: the first layer's LoRA gradients all but vanish, with only a torch
    warning). A model meant to train stays on the dequantize-and-matmul path, in eval mode too;
    scoring models keep the fast kernel.
    """
    import bitsandbytes as bnb  # present: check_hardware ran when the base loaded

    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_scoring_model(base: ResolvedBase, hardware: Hardware, adapters: dict[str, Path]):
    """The base with named, frozen adapters loaded beside each other (none: the bare base), and its tokenizer.

    Scoring several adapters on one loaded base costs one base load; `set_adapter(name)` picks one.
    """
    tokenizer = load_tokenizer(base.source, base.load_revision)
    model = load_base(base.source, base.load_revision, hardware)
    if not adapters:
        return model, tokenizer
    for name, path in adapters.items():
        model = load_adapter(model, path, adapter_name=name)
    return model, tokenizer


def load_adapter(model, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """`model` with the adapter in `adapter_dir` loaded as `adapter_name` (a PeftModel gains one more).

    Every tensor of the adapter must fit the base and every LoRA module its config creates must
    get a tensor: peft raises on a shape mismatch, but drops tensors its config does not target,
    and leaves modules without tensors at their initial values, with a warning at most.
    ConfigurationError naming the adapter folder (the version) otherwise.
    """
    adapter_dir = Path(adapter_dir)
    base_name = model.config.name_or_path or "the base model"
    fix = "it was trained on another base, or its adapter_config.json was changed; use the base it was trained on"
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
    except RuntimeError as exc:  # torch's load_state_dict: "size mismatch for <key>: copying a param with shape ..."
        if "size mismatch" not in str(exc):
            raise
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ConfigurationError(
            f"the adapter of {adapter_dir.name} ({adapter_dir}) does not fit {base_name}: {detail}; {fix}"
        ) from exc
    # save_embedding_layers=False: "auto" would look up the config named by `base_model_name_or_path`
    # (`embedded/<hash>` is relative, so on the hub) to see whether the vocabulary grew; it never does here.
    expected_state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    expected = {key: tuple(tensor.shape) for key, tensor in expected_state.items()}
    with safe_open(str(adapter_dir / layout.ADAPTER_WEIGHTS), framework="pt") as weights:
        stored = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    mismatches = [f"{key} is not in the adapter file" for key in sorted(set(expected) - set(stored))]
    mismatches += [f"{key} fits no module the adapter config creates" for key in sorted(set(stored) - set(expected))]
    mismatches += [
        f"{key} has shape {list(stored[key])}, the base needs {list(expected[key])}"
        for key in sorted(set(stored) & set(expected))
        if stored[key] != expected[key]
    ]
    if mismatches:
        raise ConfigurationError(
            f"the adapter of {adapter_dir.name} ({adapter_dir}) does not fit {base_name}: {len(mismatches)} tensors differ, "
            f"e.g. {mismatches[0]}; {fix}"
        )
    return model
