"""Export a version as a merged model: its base with the version's LoRA update added into the weights
(PEFT's `merge_and_unload`), saved as safetensors with the base's tokenizer, for servers and tools
that take no adapters.

The base loads unquantized, in float32 on the CPU, whatever the version was trained on: merging into
4-bit weights would round most of the update away, so a version trained on a 4-bit base (QLoRA) is
merged onto the full-precision base, and the export says so. The files go into a hidden folder beside
OUT that is renamed into place: OUT holds a complete export or none. Knows nothing about training or
the gate; the registry checks the version's files before they are read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as installed_version
from pathlib import Path

from incremental.manifest import BaseModelRef
from incremental.files import share_with_group
from incremental.prompting import build_prompt
from incremental.registry import Registry
from incremental.settings import Settings

log = logging.getLogger("incremental")

# Written into every export: what it was made from. Its presence also marks a folder that
# `overwrite=True` may replace (it never deletes a folder that holds anything else).
EXPORT_RECORD = "incremental_export.json"
EXPORT_README = "README.md"
MERGED_DTYPE = "float32"


@dataclass(frozen=True)
class ExportResult:
    version: str
    path: Path
    base: BaseModelRef
    files: tuple[str, ...]
    unquantized_from_4bit: bool  # trained on a 4-bit base, merged onto the full-precision one


def export_merged(settings: Settings, model: str, version: str, out: Path, *, overwrite: bool = False) -> ExportResult:
    """Write `version` of `model`, merged into its base, to the folder `out` (new or empty; with
    `overwrite`, also a previous export). ValueError naming the fix when `out` cannot take it,
    RegistryError for an unknown or damaged version, before any model is loaded."""
    import torch
    from transformers import AutoTokenizer

    from incremental.modeling import Hardware, load_adapter, load_base, locate_base

    out = Path(out).expanduser()
    registry = Registry(settings.models_root, model)
    _check_destination(out, registry, overwrite=overwrite)
    manifest = registry.get(version).manifest
    adapter_dir = registry.adapter_dir(version)  # every file checked against the manifest's hashes
    base = locate_base(manifest.base_model, settings)
    from_4bit = manifest.training.quantization == "4bit"
    if from_4bit:
        log.info(
            "[INCREMENTAL] %s was trained on the 4-bit base; merging it onto the unquantized base (%s), whose outputs "
            "differ slightly from the 4-bit model the gate judged", version, MERGED_DTYPE,
        )  # fmt: skip
    log.info("[INCREMENTAL] Merging %s into its base %s (%s, CPU)", version, base.ref.id, MERGED_DTYPE)
    network = load_adapter(load_base(base.source, base.load_revision, Hardware(device="cpu", quantization="none")), adapter_dir)
    merged = network.merge_and_unload()
    assert next(merged.parameters()).dtype == torch.float32, "the base must load in float32 on the CPU"
    merged.config.use_cache = True  # load_base turns it off for training; a served model wants it
    tokenizer = AutoTokenizer.from_pretrained(base.source, revision=base.load_revision)  # as the base ships it

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        merged.save_pretrained(staging)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(staging)
        record = {
            "model": model,
            "version": version,
            "status": manifest.status,
            "base_model": manifest.base_model.model_dump(mode="json"),
            "adapter_sha256": manifest.adapter_sha256,
            "trained_quantization": manifest.training.quantization,
            "prompt_layout": manifest.prompt_layout,
            "prompt_example": build_prompt("erd", "<meeting notes>", prompt_layout=manifest.prompt_layout),
            "merged_dtype": MERGED_DTYPE,
            "merged_with": "peft merge_and_unload",
            "exported_at": datetime.now(UTC).isoformat(),
            "libraries": {name: installed_version(name) for name in ("torch", "transformers", "peft")},
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (staging / EXPORT_README).write_text(_readme(record, from_4bit), encoding="utf-8")
        for path in staging.rglob("*"):
            share_with_group(path)
        share_with_group(staging)
        _move_into_place(staging, out)
    except BaseException:  # interrupts too: a half-written export must not stay beside OUT
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()))
    log.info("[INCREMENTAL] Exported %s merged into %s to %s", version, base.ref.id, out)
    return ExportResult(version=version, path=out, base=manifest.base_model, files=files, unquantized_from_4bit=from_4bit)


def _check_destination(out: Path, registry: Registry, *, overwrite: bool) -> None:
    if out.resolve().is_relative_to(registry.root.resolve()):
        raise ValueError(
            f"{out} is inside the version tree of {registry.model!r} ({registry.root}); versions are immutable, "
            "so export to a folder outside INCREMENTAL_MODELS_ROOT"
        )
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"{out} exists and is not a folder; choose a new or empty folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"{out} is not empty; choose a new or empty folder, or pass --overwrite to replace a previous export there"
        )
    if not (out / EXPORT_RECORD).is_file():
        raise ValueError(
            f"{out} holds files that no `incremental export` wrote (it has no {EXPORT_RECORD}); --overwrite replaces "
            "only a previous export, so choose a new or empty folder"
        )


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished export to `out`; a previous export there is moved aside first and then deleted,
    so `out` holds the old export, then briefly nothing, then the new one, never a mix."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.rename(out, replaced)
    os.rename(staging, out)
    shutil.rmtree(replaced, ignore_errors=True)


def _readme(record: dict, from_4bit: bool) -> str:
    base = record["base_model"]
    revision = f" (revision {base['revision']})" if base.get("revision") else ""
    caveat = (
        "\nThe version was trained on the base loaded in 4-bit (QLoRA); its update is merged here into the unquantized "
        "base, so outputs differ slightly from those of the 4-bit model the gate judged.\n"
        if from_4bit
        else ""
    )
    return (
        f"# {record['model']} {record['version']}, merged\n\n"
        f"Version `{record['version']}` of the model `{record['model']}` (gate status: {record['status']}), made by "
        f"incremental-lora: its LoRA adapter merged into the base model `{base['id']}`{revision} with PEFT's "
        f"`merge_and_unload`, saved in {record['merged_dtype']} safetensors with the base's tokenizer.\n"
        f"{caveat}\n"
        "Load it like any transformers model:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        "```\n\n"
        f"Prompt it as it was trained (prompt layout {record['prompt_layout']}): the tokenizer's BOS token, then this text "
        "with the artifact type (`erd`, `api` or `prototype`) and the notes filled in; greedy decoding until EOS.\n\n"
        f"```text\n{record['prompt_example']}```\n\n"
        f"`{EXPORT_RECORD}` records the version, its base, its prompt layout, the adapter's sha256 and the library versions.\n"
    )
