"""Serve the model: the base plus the current accepted adapter, resolved from the `finetuned_models/`
tree alone (no database), so an inference process can load while a run holds DuckDB. The version's
files and the base's are checked against their recorded hashes first: a damaged one is refused,
never served. Reports Base Mode or Incremental Mode in the log vocabulary users grep for.

`load_model` + `generate_artifact` load once and decode. `Generator` is what a server keeps: it
records every generation (with the version that produced it) in the feedback store, so rating one
takes only its id, and with `follow` it notices a promotion or rollback (a stat of the pointer file
per request) and swaps adapters between requests, on the base it already holds. It knows nothing
about HTTP (`http_api.py`) or about training and the gate.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from incremental import layout
from incremental.errors import ConfigurationError, IncrementalError
from incremental.feedback import FeedbackStore, Generation
from incremental.feedback.generations import RATE_SOURCE
from incremental.feedback.ingest import MAX_FIELD_BYTES
from incremental.manifest import BaseModelRef
from incremental.modeling import (
    Hardware,
    ResolvedBase,
    load_adapter,
    load_base,
    load_tokenizer,
    locate_base,
    resolve_base,
)
from incremental.prompting import ARTIFACT_TYPES
from incremental.registry import Registry
from incremental.scoring import generate_greedy, prompt_ids
from incremental.settings import Settings
from incremental.threads import apply_threads

__all__ = [
    "BASE",
    "GenerationRequestError",
    "Generator",
    "LoadedModel",
    "ServingStatus",
    "generate",
    "generate_artifact",
    "load_model",
]

log = logging.getLogger("incremental")

# The `version` that pins the base model alone, as in `incremental rollback base`.
BASE = "base"
DEFAULT_MAX_NEW_TOKENS = 256


class GenerationRequestError(IncrementalError, ValueError):
    """A generation request was refused before the model ran (bad artifact type, notes or length)."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    mode: Literal["base", "incremental"]
    version: str | None
    base: BaseModelRef
    prompt_layout: int  # the version's (`Manifest.prompt_layout`); the base model alone: Settings.prompt_layout


@dataclass(frozen=True)
class ServingStatus:
    """What a `Generator` serves now, and why that differs from the pointer if it does."""

    model: str
    version: str | None  # None: the base model (Base Mode)
    mode: Literal["base", "incremental"]
    follow: bool
    last_error: str | None  # why the version the pointer names is not served; None when they agree


def load_model(model: str | None = None, settings: Settings | None = None, *, version: str | None = None) -> LoadedModel:
    """Base + the current accepted adapter of `model` (default INCREMENTAL_MODEL), ready for inference.

    `version` pins another finished version instead of the current one (`BASE`: the base model alone).
    """
    settings = settings or Settings()
    registry = Registry(settings.models_root, model or settings.model)
    target, pinned = _target(registry, version)
    network, tokenizer, base = _load(registry, settings, target, pinned=pinned)
    return LoadedModel(
        model=network, tokenizer=tokenizer, mode="incremental" if target else "base", version=target, base=base.ref,
        prompt_layout=_layout_of(registry, target, settings),
    )  # fmt: skip


def generate_artifact(
    loaded: LoadedModel, artifact_type: str, notes: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> str:
    """Greedy decoding of one artifact from meeting notes (deterministic, so outputs can be compared)."""
    return _decode(loaded.model, loaded.tokenizer, artifact_type, notes, max_new_tokens, loaded.prompt_layout)


def generate(
    artifact_type: str,
    notes: str,
    *,
    model: str | None = None,
    settings: Settings | None = None,
    version: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Generation:
    """Load the current version (or `version`), generate one artifact and record it; rate it by its `id`.

    Loads the model on every call: a server or an app that generates repeatedly keeps a `Generator`.
    """
    generator = Generator(model, settings, version=version, follow=False)
    return generator.generate(artifact_type, notes, max_new_tokens=max_new_tokens)


class Generator:
    """The model a server keeps: generates, records each generation, and (with `follow`) serves the
    version the pointer names, swapping adapters between requests when a promotion or rollback moves it.

    One generation or one swap runs at a time (a lock), so a request in flight finishes on the version
    it started with, and each `Generation` records that version. A swap loads the new adapter beside
    the old one on the same base, switches to it and unloads the old one; a version that fails to
    load (damaged files, an adapter that does not fit the base) is not switched to: the old version
    keeps serving and `last_error` says why (logged too). It is tried again only when the pointer moves.
    """

    def __init__(
        self,
        model: str | None = None,
        settings: Settings | None = None,
        *,
        version: str | None = None,
        follow: bool | None = None,
        store: FeedbackStore | None = None,
    ) -> None:
        """`version` pins a finished version (`BASE`: the base model) instead of the current one.
        `follow` (default: follow unless `version` pins one) swaps to whatever the pointer names.
        `store`: where generations are recorded (default: INCREMENTAL_DB_PATH, created if missing)."""
        if follow is None:
            follow = version is None
        if follow and version is not None:
            raise ValueError(f"follow: version={version!r} pins one version; pass follow=False, or leave version out to follow")
        self.settings = settings = settings or Settings()
        self.model = model or settings.model
        self.follow = follow
        self._registry = Registry(settings.models_root, self.model)
        if store is None:
            store = FeedbackStore(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s)
            store.init()  # before the model loads: a database that cannot be used is answered at once
        self._store = store
        self._pointer = self._registry.root / layout.CURRENT_POINTER
        self._lock = threading.Lock()  # the model: one generation or one switch at a time
        self._refresh_lock = threading.Lock()  # one pointer check-and-load at a time
        # Read before the pointer is resolved: a move while the model loads is seen by the next request.
        self._stamp = _pointer_stamp(self._pointer)
        target, pinned = _target(self._registry, version)
        self._network, self._tokenizer, base = _load(self._registry, settings, target, pinned=pinned, adapter_name=target)
        self._base = base.ref
        self._version = target
        self._layout = _layout_of(self._registry, target, settings)
        self.last_error: str | None = None

    @property
    def version(self) -> str | None:
        """The version serving now; None: the base model."""
        return self._version

    def status(self) -> ServingStatus:
        version = self._version
        return ServingStatus(
            model=self.model, version=version, mode="incremental" if version else "base", follow=self.follow,
            last_error=self.last_error,
        )  # fmt: skip

    def generate(self, artifact_type: str, notes: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Generation:
        """Generate one artifact greedily with the prompt layout training uses, record it and return it
        (its `id` is what `rate` takes, its `version` the version that produced it)."""
        _check_request(artifact_type, notes, max_new_tokens)
        if self.follow:
            self.refresh()
        with self._lock:
            version = self._version
            apply_threads(self.settings)  # torch keeps the thread count per thread; requests come on many
            output = _decode(self._network, self._tokenizer, artifact_type, notes, max_new_tokens, self._layout)
        generation = Generation(
            model=self.model, version=version, artifact_type=artifact_type, notes=notes, output=output,
            decoding={"do_sample": False, "max_new_tokens": max_new_tokens},
        )  # fmt: skip
        self._store.record_generation(generation)
        log.info("[INCREMENTAL] Generated %s (%s) with %s", generation.id, artifact_type, _label(version))
        return generation

    def rate(
        self,
        generation_id: str,
        rating: str,
        *,
        correction: str | None = None,
        source: str = RATE_SOURCE,
        rater: str | None = None,
    ) -> str:
        """Store the rating of a recorded generation as one feedback row (see `FeedbackStore.rate`); returns its id.
        `rater` is who rated it (None: not known)."""
        return self._store.rate(generation_id, rating, correction=correction, source=source, rater=rater)

    def refresh(self) -> bool:
        """Serve the version the pointer names, if the pointer moved since the last check; True when it switched.

        Costs one stat of the pointer file when nothing moved. A version that cannot be served is
        not switched to: `last_error` says why, and it is not tried again until the pointer moves.
        """
        if _pointer_stamp(self._pointer) == self._stamp:
            return False
        with self._refresh_lock:
            stamp = _pointer_stamp(self._pointer)
            if stamp == self._stamp:
                return False  # another request switched while this one waited
            self._stamp = stamp
            try:
                target = self._registry.current()
                if target == self._version:
                    self.last_error = None
                    return False
                self._switch(target)
            # Broad on purpose: whatever stops a version from loading (damaged files, a base it does
            # not fit, memory) must leave the old version serving, with the reason reported.
            except Exception as error:
                self.last_error = f"not switched from {_label(self._version)}: {error}"
                if isinstance(error, IncrementalError):
                    log.error("[INCREMENTAL] ❌ %s", self.last_error)
                else:
                    log.exception("[INCREMENTAL] ❌ %s", self.last_error)
                return False
            self.last_error = None
            return True

    def _switch(self, target: str | None) -> None:
        previous = self._version
        if target is None:
            with self._lock:
                if isinstance(self._network, PeftModel):
                    self._network = self._network.unload()  # the base's own modules back, every adapter gone
                self._version, self._layout = None, self.settings.prompt_layout
            log.info("[INCREMENTAL] 🔁 Serving the base model (was %s)", _label(previous))
            return
        info = self._registry.get(target)
        if (info.manifest.base_model.id, info.manifest.base_model.revision) != (self._base.id, self._base.revision):
            raise ConfigurationError(
                f"{target} was trained on base model {info.manifest.base_model.id!r} (revision "
                f"{info.manifest.base_model.revision}), but this server runs {self._base.id!r} (revision "
                f"{self._base.revision}); restart the server to serve {target}"
            )
        if info.manifest.status != "accepted":
            log.warning("[INCREMENTAL] %s was rejected by the gate; serving it because the pointer names it", target)
        adapter_dir = self._registry.adapter_dir(target)  # hashes every file, outside the lock: requests go on
        log.info("[INCREMENTAL] Loading %s beside %s", target, _label(previous))
        with self._lock:
            network = _attach(self._network, adapter_dir, target)
            network.set_adapter(target, inference_mode=True)
            if previous is not None:
                network.delete_adapter(previous)
            network.eval()
            self._network, self._version, self._layout = network, target, info.manifest.prompt_layout
        log.info("[INCREMENTAL] 🔁 Serving %s (was %s)", target, _label(previous))


def _check_request(artifact_type: object, notes: object, max_new_tokens: object) -> None:
    """Refuse a request the model should not run, naming the field and the fix (GenerationRequestError)."""
    if artifact_type not in ARTIFACT_TYPES:
        raise GenerationRequestError(f"artifact_type {artifact_type!r}: use one of {', '.join(ARTIFACT_TYPES)}")
    if not isinstance(notes, str) or not notes.strip():
        raise GenerationRequestError("notes: empty; pass the meeting notes to generate the artifact from")
    try:
        size = len(notes.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise GenerationRequestError(
            f"notes: not valid Unicode (a lone surrogate at position {error.start}); send the notes as UTF-8 text"
        ) from None
    if size > MAX_FIELD_BYTES:
        raise GenerationRequestError(
            f"notes: {size} bytes, over the limit of {MAX_FIELD_BYTES // (1024 * 1024)} MiB (a rating could not store them); shorten them"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationRequestError(f"max_new_tokens {max_new_tokens!r}: must be a whole number of at least 1")


def _target(registry: Registry, version: str | None) -> tuple[str | None, bool]:
    """The version to load (None: the base model) and whether it was pinned instead of read from the pointer."""
    if version is None:
        return registry.current(), False
    if version == BASE:
        return None, True
    return registry.get(version).name, True  # an unknown version is refused naming the latest ones


def _load(
    registry: Registry, settings: Settings, target: str | None, *, pinned: bool, adapter_name: str | None = None
) -> tuple[torch.nn.Module, Any, ResolvedBase]:
    """The base with `target`'s adapter (None: the base alone) in eval mode, its tokenizer and the base."""
    hardware = Hardware.from_settings(settings)
    if target is None:
        if pinned:
            log.info("[INCREMENTAL] Loading base model (pinned; the current version is %s)", _label(registry.current()))
        else:
            log.info("[INCREMENTAL] Loading base model (no previous fine-tuning found)")
        base = resolve_base(settings)
        network = load_base(base.source, base.load_revision, hardware)
        if not pinned:
            log.info("[INCREMENTAL] 🆕 Base Mode: the next training starts from the base model")
    else:
        if pinned:
            log.info("[INCREMENTAL] Loading pinned version %s (the current version is %s)", target, _label(registry.current()))
        else:
            log.info("[INCREMENTAL] Loading previous fine-tuned model: %s", target)
        adapter_dir = registry.adapter_dir(target)  # refuses a damaged version before the base is loaded
        info = registry.get(target)
        if info.manifest.status != "accepted":
            log.warning("[INCREMENTAL] %s was rejected by the gate (%s)", target, info.manifest.gate.verdict)
        base = locate_base(info.manifest.base_model, settings)
        network = load_base(base.source, base.load_revision, hardware)
        network = load_adapter(network, adapter_dir, adapter_name=adapter_name or "default")
        log.info("[INCREMENTAL] ✅ Successfully loaded fine-tuned model!")
        if not pinned:
            log.info("[INCREMENTAL] 🔄 Incremental Mode: loaded %s. Next training will build on: %s", target, target)
    network.eval()
    return network, load_tokenizer(base.source, base.load_revision), base


def _attach(network: torch.nn.Module, adapter_dir: Path, name: str) -> PeftModel:
    """`network` with the adapter in `adapter_dir` loaded beside its others as `name`, not yet active.

    On failure `network` is left as it was: the half-loaded adapter is deleted from a PeftModel, and a
    bare base gets its own modules back (peft wraps them in place before it reads the weights).
    """
    try:
        return load_adapter(network, adapter_dir, adapter_name=name)
    except BaseException:
        if isinstance(network, PeftModel):
            if name in network.peft_config:
                network.delete_adapter(name)
        else:
            _remove_tuner_layers(network)
        raise


def _remove_tuner_layers(model: torch.nn.Module) -> None:
    """Put back the base layers peft wrapped in `model` (what `unload` does, for a wrap that failed halfway)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _layout_of(registry: Registry, target: str | None, settings: Settings) -> int:
    """The prompt layout `target` was trained with; the base model alone is prompted as a first version
    would be trained (`settings.prompt_layout`)."""
    return settings.prompt_layout if target is None else registry.get(target).manifest.prompt_layout


def _decode(
    network: torch.nn.Module, tokenizer: Any, artifact_type: str, notes: str, max_new_tokens: int, prompt_layout: int
) -> str:
    """One request through the one decoder (`scoring.generate_greedy`), prompted in the served version's
    `prompt_layout`, after checking it fits the context."""
    n_prompt = len(prompt_ids(tokenizer, artifact_type, notes, prompt_layout=prompt_layout))
    context = getattr(network.config, "max_position_embeddings", None)
    if context is not None and n_prompt + max_new_tokens > context:
        raise GenerationRequestError(
            f"notes: {n_prompt} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's context of "
            f"{context} tokens; shorten the notes or lower max_new_tokens"
        )
    prompts = [(artifact_type, notes)]
    return generate_greedy(network, tokenizer, prompts, max_new_tokens=max_new_tokens, prompt_layout=prompt_layout)[0]


def _pointer_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the pointer is replaced (it is written to a new file and renamed): None without one."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _label(version: str | None) -> str:
    return version if version is not None else "the base model"
