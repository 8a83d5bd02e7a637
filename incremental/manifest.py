"""The manifest of a version: everything needed to explain and reproduce its gate decision on paper.

Written last into a version folder (its presence marks the folder complete), as sorted JSON with a
schema version. Loading is tolerant of fields added by later releases (`extra="allow"`), so old
folders stay readable and new ones can carry more.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_SCHEMA_VERSION = 1

_RECORD = ConfigDict(frozen=True, extra="allow")


class BaseModelRef(BaseModel):
    """Which base the adapter sits on. An adapter is only valid on the exact base it was trained on."""

    model_config = _RECORD

    id: str = Field(description="Hub id or local path of the base model.")
    revision: str | None = Field(None, description="Hub revision, or a content hash for local/embedded bases.")


class DataRecord(BaseModel):
    """What the run learned from and what it was judged on."""

    model_config = _RECORD

    dataset_hash: str = Field(description="sha256 over the train examples (ids and text), in order.")
    eval_snapshot_hash: str = Field(description="sha256 over the eval examples; candidate and parent share it.")
    new_ids: tuple[str, ...] = Field(description="Feedback rows learned for the first time by this lineage.")
    replay_ids: tuple[str, ...] = Field(description="Older rows of the lineage replayed against forgetting.")
    eval_ids: tuple[str, ...] = Field(description="Held-out rows the gate scored on (never trained).")
    rejected_ids: tuple[str, ...] = Field((), description="'needs_improvement' rows without a correction: scored, never trained.")
    n_train_examples: int
    n_truncated: int = 0


class TrainingRecord(BaseModel):
    """How the candidate was trained."""

    model_config = _RECORD

    mode: Literal["base", "incremental"]
    device: str
    quantization: Literal["4bit", "none"]
    steps: int
    epochs: float
    train_loss: float | None
    first_step_loss: float | None = None
    trainable_parameters: int
    target_tokens: int
    wall_seconds: float


class GateRecord(BaseModel):
    """The gate's verdict, with one human-readable reason per check."""

    model_config = _RECORD

    verdict: Literal["accept", "reject"]
    reasons: tuple[str, ...]
    policy: dict


class PromotionRecord(BaseModel):
    """What happened to the pointer when the version was finalized."""

    model_config = _RECORD

    promoted: bool
    reason: str


class Manifest(BaseModel):
    """One version's record. `status` and `promotion` are decided by the registry under its lock."""

    model_config = _RECORD

    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    model: str
    parent: str | None = Field(description="The accepted version this one was trained from; None for base mode.")
    status: Literal["accepted", "rejected"]
    created_at: datetime
    finalized_at: datetime | None = None
    base_model: BaseModelRef
    run_config: dict
    libraries: dict[str, str]
    data: DataRecord
    training: TrainingRecord
    scores: dict[str, dict[str, float | None]] = Field(
        description="{'candidate': {metric: value}, 'parent': {metric: value}} on the same eval snapshot."
    )
    gate: GateRecord
    promotion: PromotionRecord | None = None
    adapter_sha256: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
