"""Run configuration: the knobs of one retraining run, frozen and stored in every version.

These models are the `retrain` flow's parameters, so the Prefect UI renders them as a form and
validates them before a run starts. Environment (paths, device) lives in `settings.py` instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, extra="forbid")

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """LoRA shape for a *new* adapter (base mode). A continued adapter keeps its parent's shape."""

    model_config = _FROZEN

    r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        LLAMA_PROJECTIONS, min_length=1, description="Linear layers that get an adapter (all of them matches full fine-tuning best)."
    )


class TrainSettings(BaseModel):
    """Optimizer and schedule. Each run starts a fresh optimizer on the parent's weights.

    Changed from transformers' `TrainingArguments` defaults: learning_rate (2e-3 rather than 5e-5,
    since LoRA on few examples wants a high rate), epochs (4 rather than 3), batch size (8),
    warmup (0.1 of steps), and no checkpoints are saved mid-run (the version folder is the output).
    """

    model_config = _FROZEN

    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (linear decay after warmup).")
    epochs: float = Field(4.0, gt=0, le=100, description="Passes over the train split (new + replay rows).")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Steps accumulated before an optimizer update.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_length: int = Field(512, ge=16, le=32768, description="Longest prompt + target in tokens; longer examples are cut from the end of the target.")
    seed: int = Field(0, description="Seed for adapter init, shuffling and replay sampling.")


class DataSettings(BaseModel):
    """Which feedback goes into a run."""

    model_config = _FROZEN

    replay_ratio: float = Field(
        1.0, ge=0.0, le=10.0, description="Replayed older rows per new row (against forgetting); 0 trains on new rows only."
    )
    max_replay_rows: int = Field(2000, ge=0, description="Upper bound on replayed rows, so cost stays O(new + bounded replay).")
    min_new_rows: int = Field(1, ge=1, description="Fewer new trainable rows than this and the run is skipped.")


class GatePolicy(BaseModel):
    """When a candidate may replace its parent. Margins are in nats per target token."""

    model_config = _FROZEN

    max_nll_increase: float = Field(
        0.02, ge=0.0, description="Candidate target NLL may exceed the parent's by at most this much."
    )
    max_prompt_gain_drop: float = Field(
        0.03, ge=0.0, description="Candidate prompt gain (how much it uses the notes) may fall below the parent's by at most this much."
    )
    min_eval_examples: int = Field(4, ge=1, description="Fewer held-out examples than this and nothing is promoted.")


class RunConfig(BaseModel):
    """Everything that shapes one run; stored verbatim in the version's manifest."""

    model_config = _FROZEN

    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    data: DataSettings = DataSettings()
    gate: GatePolicy = GatePolicy()
