"""Load the model to serve: the base plus the current accepted adapter, resolved from the
`finetuned_models/` tree alone (no database), so an inference process can load while a run holds
DuckDB. The version's files and the base's are checked against their recorded hashes first: a
damaged one is refused, never served. Reports Base Mode or Incremental Mode in the log vocabulary
users grep for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from incremental.manifest import BaseModelRef
from incremental.modeling import Hardware, load_adapter, load_base, load_tokenizer, locate_base, resolve_base
from incremental.prompting import build_prompt
from incremental.registry import Registry
from incremental.settings import Settings

log = logging.getLogger("incremental")


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    mode: Literal["base", "incremental"]
    version: str | None
    base: BaseModelRef


def load_model(model: str | None = None, settings: Settings | None = None) -> LoadedModel:
    """Base + the current accepted adapter of `model` (default INCREMENTAL_MODEL), ready for inference."""
    settings = settings or Settings()
    model = model or settings.model
    registry = Registry(settings.models_root, model)
    hardware = Hardware.from_settings(settings)
    current = registry.current()
    if current is None:
        log.info("[INCREMENTAL] Loading base model (no previous fine-tuning found)")
        base = resolve_base(settings)
        network = load_base(base.source, base.load_revision, hardware)
        log.info("[INCREMENTAL] 🆕 Base Mode: the next training starts from the base model")
        mode: Literal["base", "incremental"] = "base"
    else:
        log.info("[INCREMENTAL] Loading previous fine-tuned model: %s", current)
        adapter_dir = registry.adapter_dir(current)  # refuses a damaged version before the base is loaded
        base = locate_base(registry.get(current).manifest.base_model, settings)
        network = load_adapter(load_base(base.source, base.load_revision, hardware), adapter_dir)
        log.info("[INCREMENTAL] ✅ Successfully loaded fine-tuned model!")
        log.info("[INCREMENTAL] 🔄 Incremental Mode: loaded %s. Next training will build on: %s", current, current)
        mode = "incremental"
    network.eval()
    return LoadedModel(
        model=network, tokenizer=load_tokenizer(base.source, base.load_revision), mode=mode, version=current, base=base.ref
    )


def generate_artifact(loaded: LoadedModel, artifact_type: str, notes: str, *, max_new_tokens: int = 256) -> str:
    """Greedy decoding of one artifact from meeting notes (deterministic, so outputs can be compared)."""
    tokenizer = loaded.tokenizer
    # Notes may contain "<s>" or "</s>" (HTML strikethrough): text, never the special tokens.
    prompt_ids = tokenizer(build_prompt(artifact_type, notes), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    device = next(loaded.model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,  # load_base turns the cache off for training; decoding wants it
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)
