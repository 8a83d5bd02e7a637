"""The manifest of a version: everything needed to explain and reproduce its gate decision on paper.

Written last into a version folder (its presence marks the folder complete), as sorted JSON with a
schema version. It records the sha256 of every other file in the folder, so a changed byte in the
adapter, its config or the scores is caught before the version is used. Loading is tolerant: fields
added by later releases are kept (`extra="allow"`), and older schemas are read as they were meant.
It records what `finalize` decided about the pointer, never whether the pointer moved: that is what
`current.json` and `history.jsonl` say (the manifest is written before the pointer moves).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# 3: `files` (sha256 of every file), `promotion.decision` in place of `promotion.promoted`.
# 4: `prompt_layout` (absent before: layout 1, the only one there was).
MANIFEST_SCHEMA_VERSION = 4

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
    arrived_with_batch_ids: tuple[str, ...] = Field(
        (), description="Eval and rejected-output rows that arrived with this batch: scored and reported, never trusted."
    )
    screened_ids: tuple[str, ...] = Field((), description="New rows the screening held before training (not trained).")
    n_train_examples: int
    new_by_generating_version: dict[str, int] = Field(
        default_factory=dict,
        description="New rows per version that generated their output (`generated_by`); 'unrecorded' when a row names none.",
    )
    eval_window: dict = Field(
        default_factory=dict,
        description="How the eval rows were chosen: the per-type bound and anchors, and rows available vs scored.",
    )
    recipe: str | None = Field(
        None,
        description="Which training recipe the run applied and why: 'configured', or 'novel batch (...)' when enough new "
        "rows were new to the parent that replay and epochs were raised (RunConfig.novel_batch; run_config shows the "
        "values trained with). None in manifests written before recipes were fitted.",
    )


class TrainingRecord(BaseModel):
    """How the candidate was trained."""

    model_config = _RECORD

    mode: Literal["base", "incremental"]
    device: str
    quantization: Literal["4bit", "none"]
    steps: int
    epochs: float
    train_loss: float | None
    trainable_parameters: int
    target_tokens: int
    wall_seconds: float
    n_truncated: int = Field(0, description="Train examples cut to max_length.")
    # Throughput over `Trainer.train` alone (see throughput.py); None in manifests written before it was measured.
    tokens_per_second: float | None = Field(None, description="Real (non-padding) input tokens trained per second.")
    pad_per_real_token: float | None = Field(None, description="Padding positions per real token in the training batches.")
    mfu: float | None = Field(
        None, description="Model FLOPs utilization: LoRA model FLOPs of the real tokens per second over `peak_flops`."
    )
    peak_flops: float | None = Field(
        None, description="The device's measured peak (FLOP/s): a timed float32 matrix product on CPU, bfloat16 on CUDA."
    )
    batching: str | None = Field(
        None, description="How the training batches were built (TrainSettings.batching as resolved for the device); "
        "None in manifests written before it was recorded.",
    )  # fmt: skip
    processes: int = Field(1, description="Processes that trained it together (DDP, INCREMENTAL_TRAIN_PROCESSES).")
    ranks: tuple[dict, ...] = Field(
        (), description="Under DDP, each rank: its number, the sha256 of its adapter after training, whether it saved it."
    )


class GateRecord(BaseModel):
    """The gate's verdict, with one human-readable reason per check."""

    model_config = _RECORD

    verdict: Literal["accept", "reject", "inconclusive"]
    reasons: tuple[str, ...]
    policy: dict
    checks: tuple[dict, ...] = Field(
        (), description="One record per metric and slice: n, candidate, parent, delta, interval, margin, outcome, reason."
    )
    held_ids: tuple[str, ...] = Field((), description="Rows held because the gate blamed this batch.")
    evaluation: dict = Field({}, description="Evaluation cost: parent scores computed and taken from the cache, wall seconds.")


class PromotionRecord(BaseModel):
    """What `finalize` decided about the pointer, under the registry lock, just before acting on it.

    A decision, not an outcome: a crash between writing the manifest and moving the pointer leaves a
    version that was to be promoted and never was. `Registry.versions()` tells which
    (`VersionInfo.promotion_state`) from the pointer and the history.
    """

    model_config = _RECORD

    decision: Literal["promote", "keep"] = Field(
        description="promote: the gate accepted and the parent was still current; keep: the pointer stays where it was."
    )
    reason: str

    @model_validator(mode="before")
    @classmethod
    def _read_schema_2(cls, data: object) -> object:
        # Schema 2 wrote the same decision as `promoted: bool`, a name that claimed the outcome.
        if isinstance(data, dict) and "decision" not in data and isinstance(data.get("promoted"), bool):
            promoted = data["promoted"]
            data = {key: value for key, value in data.items() if key != "promoted"}
            data["decision"] = "promote" if promoted else "keep"
        return data


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
        description="{'candidate': {metric: value}, 'parent': {metric: value}} on the judged slice of the same eval "
        "snapshot (trusted rows; all rows for a first version). Per-example values are in scores.parquet."
    )
    gate: GateRecord
    prompt_layout: int = Field(
        1,
        description="The prompt layout (`prompting.py`) the adapter was trained and judged with; its children and "
        "its server keep it. Absent in manifests of schema 3 and older, which all used layout 1.",
    )
    promotion: PromotionRecord | None = None
    adapter_sha256: str | None = Field(None, description="sha256 of the adapter weights (also in `files`).")
    files: dict[str, str] = Field(
        default_factory=dict,
        description="sha256 of every file in the version folder but the manifest, recorded by finalize; checked "
        "before the version is loaded, trained from or rolled back to. Empty in manifests of schema 2 and older.",
    )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


# Libraries whose versions shape a run's result; recorded in every manifest.
RECORDED_LIBRARIES = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
    "tokenizers", "duckdb", "prefect", "incremental-lora",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a run (read from metadata, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def draft_manifest(
    *,
    name: str,
    model: str,
    parent: str | None,
    created_at: datetime,
    base: BaseModelRef,
    config,
    snapshot,
    training: TrainingRecord,
    scores: dict[str, dict[str, float | None]],
    decision,
    prompt_layout: int,
    screened_ids: tuple[str, ...] = (),
    held_ids: tuple[str, ...] = (),
    evaluation: dict | None = None,
    eval_window: dict | None = None,
    new_by_generating_version: dict[str, int] | None = None,
    recipe: str | None = None,
) -> Manifest:
    """The manifest of a finished candidate, before the registry settles status and promotion.

    `config` is the RunConfig, `snapshot` the DatasetSnapshot and `decision` the gate's `Decision`
    (typed loosely to keep this module free of heavy imports).
    """
    return Manifest(
        name=name,
        model=model,
        parent=parent,
        status="accepted" if decision.accepted else "rejected",
        created_at=created_at,
        base_model=base,
        prompt_layout=prompt_layout,
        run_config=config.model_dump(mode="json"),
        libraries=library_versions(),
        data=DataRecord(
            dataset_hash=snapshot.dataset_hash,
            eval_snapshot_hash=snapshot.eval_snapshot_hash,
            new_ids=snapshot.new_ids,
            replay_ids=snapshot.replay_ids,
            eval_ids=snapshot.eval_ids,
            rejected_ids=snapshot.rejected_ids,
            arrived_with_batch_ids=snapshot.arrived_with_batch_ids,
            screened_ids=screened_ids,
            n_train_examples=len(snapshot.new_ids) + len(snapshot.replay_ids),
            eval_window=eval_window or {},
            new_by_generating_version=new_by_generating_version or {},
            recipe=recipe,
        ),
        training=training,
        scores=scores,
        gate=GateRecord(
            verdict=decision.verdict.value,
            reasons=decision.reasons,
            policy=config.gate.model_dump(mode="json"),
            checks=tuple(check.as_record() for check in decision.checks),
            held_ids=held_ids,
            evaluation=evaluation or {},
        ),
    )
