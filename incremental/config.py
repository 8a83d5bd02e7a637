"""Run configuration: the knobs of one retraining run, frozen and stored in every version.

These models are the `retrain` flow's parameters, so the Prefect UI renders them as a form and
validates them before a run starts. Environment (paths, device) lives in `settings.py` instead.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from incremental.layout import MODEL_NAME

_FROZEN = ConfigDict(frozen=True, extra="forbid")

# A model name as a flow parameter: the same rule as the folder tree and the feedback store, so the
# Prefect server refuses `../x` (its parameter schema carries the pattern) before any run starts.
ModelName = Annotated[
    str,
    Field(
        pattern=MODEL_NAME.pattern,
        description="Model name (the folder under INCREMENTAL_MODELS_ROOT): 1-64 lowercase letters, digits, '.', '_' or '-'.",
    ),
]

# How training batches are built (incremental/batching.py). "auto" picks per device: flattened where the
# model runs FlashAttention's variable-length kernels (CUDA), else the measured CPU default.
BatchingMode = Literal["auto", "padded", "length_grouped", "token_budget", "flattened"]

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
    warmup (0.1 of steps), no checkpoints are saved mid-run (the version folder is the output), and
    batches are built per device (`batching`, incremental/batching.py) rather than padded at random.
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
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them: the "
        "activations kept for it shrink to the layers' inputs (8x fewer bytes measured on a 15M-parameter Llama), for "
        "about 40 % more time per step on CPU; loss and gradients are unchanged. QLoRA on CUDA always checkpoints.",
    )
    batching: BatchingMode = Field(
        "auto",
        description="How examples become training batches. padded: random batches of batch_size examples padded to "
        "the longest. length_grouped: transformers' length-grouped sampler. token_budget: batches of similar length "
        "within max_tokens_per_batch (examples x longest), in random order. flattened: random batches of batch_size "
        "examples joined into one row without padding, each attending only to itself (FlashAttention's "
        "variable-length kernel where the model is loaded with it, else SDPA per example). auto: flattened with "
        "FlashAttention on CUDA, else the CPU default measured in BENCHMARKS.md (train_throughput): flattened, "
        "attention per example.",
    )
    max_tokens_per_batch: int | None = Field(
        None, ge=16, le=1_048_576,
        description="token_budget only: padded tokens a batch may hold (examples x its longest example); an example "
        "longer than this trains alone. null: batch_size x the train split's mean length, so an epoch has about as "
        "many steps as with batch_size examples per batch.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _budget_needs_token_budget(self) -> TrainSettings:
        if self.max_tokens_per_batch is not None and self.batching != "token_budget":
            raise ValueError(
                f"max_tokens_per_batch={self.max_tokens_per_batch} only applies to batching='token_budget', but batching "
                f"is {self.batching!r}: set batching='token_budget', or leave max_tokens_per_batch unset (null)"
            )
        return self


class DataSettings(BaseModel):
    """Which feedback goes into a run."""

    model_config = _FROZEN

    replay_ratio: float = Field(
        1.0, ge=0.0, le=10.0, description="Replayed older rows per new row (against forgetting); 0 trains on new rows only."
    )
    min_replay_rows: int = Field(
        128, ge=0,
        description="Replayed rows a run gets at least, whatever the batch's size (when replay_ratio > 0 and the lineage "
        "has learned that many): a small batch of corrections is then learned beside what the parent already does well.",
    )
    max_replay_rows: int = Field(2000, ge=0, description="Upper bound on replayed rows, so cost stays O(new + bounded replay).")
    min_new_rows: int = Field(1, ge=1, description="Fewer new trainable rows than this and the run is skipped.")
    max_eval_rows_per_type: int | None = Field(
        128, ge=1,
        description="Trusted eval rows (and trusted rejected outputs) a run scores per artifact type: the most recent "
        "ones, so evaluation cost stays bounded as feedback accumulates; null scores every one. Rows that arrived with "
        "the batch are always scored.",
    )
    eval_anchor_rows: int = Field(
        10, ge=0, le=1000,
        description="The oldest trusted eval rows, always scored besides the window: prompt gain takes its partner "
        "notes from them, so partners (and the parent's cached scores) stay fixed while the window moves.",
    )


class MetricRule(BaseModel):
    """How much one metric may regress, candidate against parent, before the gate refuses.

    The regression is measured in the metric's bad direction (a rise for NLL, a fall for the others),
    as a paired interval. Pass: the interval's upper end is at or below the margin. Fail: its lower
    end is above the margin. Otherwise the evidence is inconclusive.
    """

    model_config = _FROZEN

    margin: float = Field(ge=0.0, description="Allowed regression in the metric's own units (absolute).")
    relative_margin: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Allowed regression as a share of the parent's value; the larger of the two margins applies, "
        "so a parent value of zero falls back to the absolute margin.",
    )
    gated: bool = Field(True, description="False: the metric is computed and reported but never decides.")
    test: Literal["non_inferiority", "deterioration"] = Field(
        "non_inferiority",
        description="non_inferiority: the candidate must be shown within the margin (an interval that straddles it "
        "keeps the parent). deterioration: the candidate fails only when it is shown worse than the margin; an "
        "interval that straddles it does not block (for metrics too coarse to show non-inferiority on the rows at hand).",
    )


class ScreeningPolicy(BaseModel):
    """Rows that look wrong are held before training, until a person releases or excludes them.

    A row is held for what makes it wrong (it does not parse, names things its notes never mention,
    does not follow from its notes, or comes in a lot with far too many such rows), never for being
    new to the parent: see incremental/screening.py and BENCHMARKS.md (gate quality) for each rule's
    measured false-hold rate on genuine corrections and new-domain rows.
    """

    model_config = _FROZEN

    enabled: bool = Field(True, description="Score each new row with the parent before training and hold suspect rows.")
    min_prompt_gain: float = Field(
        0.0,
        description="A row whose target is no more likely under its own notes than under other notes by more than "
        "this (nats per token) is suspect: it does not follow from its notes. Judged only for a type where the parent "
        "demonstrably reads notes (at most clean_suspect_share of its unseen trusted rows of the type at or under this) "
        "and for rows not new to it.",
    )
    min_grounded_share: float = Field(
        0.6, ge=0.0, le=1.0,
        description="A row is suspect when fewer than this share of the names its target declares (entities, fields) "
        "appear in its own notes: a target written for other notes, or invented fields. 0 switches the rule off.",
    )
    min_covered_share: float = Field(
        0.5, ge=0.0, le=1.0,
        description="A row is suspect when its target declares fewer than this share of the names its notes mention "
        "(words that artifacts of the parent's trusted rows or of the batch use as names; judged with 3 or more): an "
        "artifact with entities or fields left out. 0 switches the rule off.",
    )
    max_nll_z: float = Field(
        4.0, gt=0.0,
        description="Novelty threshold: a row whose per-token NLL is this many robust standard deviations above the "
        "parent's NLL on unseen rows of its type is new to the parent. That holds nothing by itself (a correction is "
        "by definition new); a novel row must have every declared name in its notes, and a flagged rater's novel rows wait. "
        "A batch with novel_batch.min_novel_share or more novel train rows trains with the novel-batch recipe.",
    )
    min_reference_rows: int = Field(
        6, ge=2, description="Fewer unseen trusted rows of an artifact type than this and the parent-based rules skip that type."
    )
    clean_suspect_share: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="Share of a clean batch's rows the rules flag anyway (measured in BENCHMARKS.md, gate quality). "
        "A lot (one rater's rows from one source) with improbably many more suspects is held whole.",
    )
    lot_p_value: float = Field(
        0.01, gt=0.0, lt=1.0,
        description="Hold every row of a lot when that many suspects would happen by chance to a clean lot with "
        "probability below this (acceptance sampling: the rules miss some bad rows, so a bad lot is held whole).",
    )
    flag_rater_bad_share: float = Field(
        0.2, gt=0.0, le=1.0,
        description="A rater is flagged when at least this share of their settled rows (released or excluded by a "
        "person, or blamed by the gate) were excluded or blamed, and at least flag_rater_min_bad of them: a flagged "
        "rater's novel rows wait for a person. A rater with no record is not flagged.",
    )
    flag_rater_min_bad: int = Field(5, ge=1, description="Bad rows a rater's record needs before it can flag them.")
    check_format: bool = Field(
        True, description="A row whose target does not parse as its declared artifact type (a Mermaid erDiagram, an "
        "OpenAPI 3 document, an HTML form) is suspect."
    )


class GatePolicy(BaseModel):
    """When a candidate may replace its parent. NLL margins are in nats per target token.

    The rules judge trusted eval rows (those that arrived before the parent was accepted, not held
    or excluded) and a user's golden file; eval rows that arrived with the batch are reported only.
    """

    model_config = _FROZEN

    # Margins sit above the noise floor measured on ~25 trusted rows of the embedded default (paired
    # 90 % intervals about +-0.008 for NLL and +-0.006 for prompt gain, BENCHMARKS.md); clean
    # candidates improved NLL on trusted rows by 0.007-0.018 there. `incremental gate calibrate`
    # measures the floor for a real model.
    target_nll: MetricRule = Field(MetricRule(margin=0.01), description="Per-token NLL of the reference targets (lower is better).")
    prompt_gain: MetricRule = Field(
        MetricRule(margin=0.03), description="How much more likely a target is under its own notes than under other notes (higher is better)."
    )
    preference_margin: MetricRule = Field(
        MetricRule(margin=0.05),
        description="On needs-improvement rows with a correction: per-token log-likelihood of the correction minus that "
        "of the rejected output (higher is better).",
    )
    # Reported, not gated, by default: the absolute likelihood of a rejected output rises whenever a
    # model learns the artifact format (measured base -> v1: -1.7 nats/token on rejected outputs), so
    # gating it rejects healthy candidates. The preference margin compares a correction with its
    # rejected output on the same notes, where format learning cancels out: that one is gated.
    rejected_nll: MetricRule = Field(
        MetricRule(margin=0.1, gated=False),
        description="On needs-improvement rows without a correction: per-token NLL of the rejected output, which "
        "should not become more likely (higher is better).",
    )
    # Gated, per type: what users receive. They are deterioration tests: a clear regression fails, but
    # on a few dozen rows a model that changes its outputs cannot be shown non-inferior (the
    # learning-curve benchmark's loop stalled on validity at n=27, "855 more rows to decide"), and "not
    # shown equal" must not stop all learning. A deterioration test needs no large sample to be sound
    # (few rows give a wide interval, which fails only on a large fall), so `min_generation_rows` is as
    # low as a type's: at 24 the benchmark's gate could not see prototype validity fall 0.65 -> 0.00
    # on its 11 trusted prototype rows.
    artifact_validity: MetricRule = Field(
        MetricRule(margin=0.1, test="deterioration"),
        description="Share of greedy generations that parse as their artifact type (higher is better).",
    )
    content_f1: MetricRule = Field(
        MetricRule(margin=0.1, test="deterioration"),
        description="F1 of the entity and field names in a greedy generation against the reference (higher is better).",
    )
    confidence: float = Field(0.9, gt=0.5, lt=1.0, description="Two-sided level of the paired bootstrap interval.")
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples per metric and slice.")
    min_eval_examples: int = Field(
        8, ge=1, description="A judged slice with fewer rows than this cannot pass a required metric: the verdict is inconclusive."
    )
    on_inconclusive: Literal["keep_parent", "promote"] = Field(
        "keep_parent", description="What an inconclusive verdict does: keep the parent (default) or promote anyway."
    )
    first_version_on_inconclusive: Literal["keep_parent", "promote"] = Field(
        "promote",
        description="What an inconclusive verdict does for a first version, judged against the base model on rows none of "
        "which are trusted yet: promote (default; a failed rule still rejects) or keep the base model.",
    )
    max_waits: int = Field(
        2, ge=0, le=100,
        description="An undecided verdict (an interval straddles its margin; no rule failed) keeps the parent and holds "
        "nothing: its rows come back as new and the next run trains on them with what arrived since. A row that has "
        "already waited through this many undecided candidates of the same parent is held for a person instead.",
    )
    new_rows_must_improve: bool = Field(
        False, description="Also require target NLL on the batch's own (untrusted) eval rows to improve clearly."
    )
    prompt_gain_partners: int = Field(
        4, ge=1, le=16, description="Other rows' notes each target is scored under for its prompt gain (averaged)."
    )
    per_type_test: Literal["non_inferiority", "deterioration"] = Field(
        "deterioration",
        description="How each artifact type's checks are judged. deterioration (default): a type fails the gate when it "
        "is shown to regress beyond the margin, while the pooled checks must still show non-inferiority; a type too "
        "small to tell reports how many more rows it needs. non_inferiority: every type must be shown within the "
        "margin too, which keeps the parent (rows wait) until every type has rows enough.",
    )
    min_rows_per_type: int = Field(
        8, ge=1,
        description="A guardrail is judged per artifact type only where a judged slice has this many rows of the type; "
        "fewer, and the type's check is reported with how many more rows it needs, while the pooled check decides.",
    )
    generation_rows: int = Field(
        64, ge=0, le=1000,
        description="Judged eval rows generated greedily per model and artifact type for validity and content F1 (the "
        "oldest, so the parent's generations stay cached); 0 skips generation.",
    )
    min_generation_rows: int = Field(
        8, ge=1,
        description="Generated rows a slice (or an artifact type within it) needs before validity and content F1 are "
        "judged there; fewer are reported with how many more they need.",
    )
    max_new_tokens: int = Field(256, ge=8, le=8192, description="Greedy generation length limit.")
    screening: ScreeningPolicy = ScreeningPolicy()


class NovelBatchRecipe(BaseModel):
    """A stronger recipe for a batch the parent finds new: a new domain, or corrections in another style.

    Training on such a batch shifts the model towards its vocabulary or style, and trusted rows get
    less likely (forgetting): measured from the demo's end state, +0.025 to +0.027 nats/token of trusted
    NLL for the default recipe, against a margin of 0.010, so the gate kept them out every time. More
    replay and epochs cut that to +0.001 (restyled corrections) and +0.008 (a new domain), for about
    twice the training time (BENCHMARKS.md: replay recipe, novel-batch recipe). Ordinary nights
    (0 to 15 % of rows new to the parent) keep the configured recipe and its cost. Screening measures
    novelty, so a run without screening (or in base mode, with no parent) always trains as configured.
    Each value only raises the configured one, never lowers it.
    """

    model_config = _FROZEN

    enabled: bool = Field(True, description="Train batches the parent finds new with the values below.")
    min_novel_share: float = Field(
        0.25, gt=0.0, le=1.0,
        description="Share of the new train rows (after screening) that must be new to the parent (screening's novelty: "
        "max_nll_z robust SDs above its NLL on unseen trusted rows of the type) for the batch to count as novel. "
        "Measured from the demo's end state: 0 to 15 % for clean batches and exact corrections, 85 to 100 % for "
        "restyled corrections, 100 % for a new domain (BENCHMARKS.md, novel-batch recipe).",
    )
    replay_ratio: float = Field(4.0, ge=0.0, le=10.0, description="Replayed older rows per new row for a novel batch.")
    min_replay_rows: int = Field(256, ge=0, description="Replayed rows a novel batch gets at least (still capped by max_replay_rows).")
    epochs: float = Field(6.0, gt=0, le=100, description="Passes over the train split for a novel batch.")


class RunConfig(BaseModel):
    """Everything that shapes one run; stored verbatim in the version's manifest (as the run applied it:
    a novel batch's manifest shows the raised replay and epochs, and `data.recipe` says why)."""

    model_config = _FROZEN

    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    data: DataSettings = DataSettings()
    gate: GatePolicy = GatePolicy()
    novel_batch: NovelBatchRecipe = NovelBatchRecipe()
