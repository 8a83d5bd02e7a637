"""Environment settings: where things live and what hardware to use.

One pydantic-settings root, read from `INCREMENTAL_*` environment variables and `.env`, built once
at an entry point (CLI, flow) and passed down. Run-to-run knobs (learning rate, gate margins) are
not here: they are the flow's parameters, see `config.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from incremental.prompting import LATEST_LAYOUT, PROMPT_LAYOUTS

EMBEDDED_BASE = "embedded"


class Settings(BaseSettings):
    """Where the feedback, the versions and the base model come from."""

    model_config = SettingsConfigDict(env_prefix="INCREMENTAL_", env_file=".env", extra="ignore", frozen=True)

    model: str = Field(
        "tiny",
        description="Default model name: the folder under `models_root` that holds its versions.",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
    )
    db_path: Path = Field(Path("feedback.duckdb"), description="DuckDB file that holds feedback and run records.")
    models_root: Path = Field(Path("finetuned_models"), description="Root of the version folders, one folder per model.")
    base_model: str = Field(
        EMBEDDED_BASE,
        description=(
            "Base model: a Hugging Face id (e.g. codellama/CodeLlama-7b-hf), a local folder, or "
            f"'{EMBEDDED_BASE}' for the tiny Llama model this project builds and pretrains on CPU."
        ),
    )
    base_model_revision: str | None = Field(None, description="Hub revision (commit or tag) of `base_model`; recorded in every manifest.")
    golden_path: Path | None = Field(
        None,
        description="Optional JSONL file of reference rows (artifact_type, prompt, target) the gate always judges on, "
        "besides the trusted feedback rows.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="'auto' loads the base in 4-bit NF4 (QLoRA) on CUDA and in float32 on CPU."
    )
    embedded_cache_dir: Path = Field(
        Path("~/.cache/incremental/embedded"),
        description="Where the embedded base model is built once and reused.",
    )
    embedded_invented_name_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the embedded base's pretraining examples whose names are invented words, so that it "
        "learns to copy names from the notes, as a real code LLM does, instead of recalling the corpus's (a different "
        "base: its own cache folder, and versions trained on one base never continue on another). 0: the corpus only. "
        "BENCHMARKS.md (replay recipe) compares 0.5 with 0.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses for training and scoring; unset: the cores this process may use "
        "(its CPU affinity, capped by its cgroup CPU quota). Set it lower when other work shares the cores.",
    )
    train_processes: int = Field(
        1,
        ge=1,
        description="Processes that train one candidate together (DDP through torchrun): one per GPU on a "
        "multi-GPU machine; on CPU they share the cores (INCREMENTAL_THREADS in all).",
    )
    db_lock_timeout_s: float = Field(30.0, gt=0, description="How long to retry when another process holds the DuckDB file.")
    rater: str | None = Field(
        None,
        description="Who rates on this machine: the rater `incremental rate` and `incremental feedback add` record "
        "when no --rater is given; unset: the login name. The feedback store checks it like any row's rater.",
    )

    prompt_layout: int = Field(
        LATEST_LAYOUT,
        description="The prompt layout (incremental/prompting.py) a new lineage starts with: its first version, trained "
        "from the base, and the base model served in Base Mode. A lineage keeps the layout it started with. 2 (the "
        "latest) names the artifact type right before the output; 1 only in the first line. Set 1 when an app outside "
        "this project builds layout-1 prompts itself.",
    )

    @field_validator("prompt_layout")
    @classmethod
    def _known_layout(cls, value: int) -> int:
        if value not in PROMPT_LAYOUTS:
            raise ValueError(f"INCREMENTAL_PROMPT_LAYOUT={value}: use one of {', '.join(map(str, PROMPT_LAYOUTS))}")
        return value

    @field_validator("embedded_cache_dir", "db_path", "models_root")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    def resolved_device(self) -> str:
        """'cuda' or 'cpu'; 'auto' picks CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch  # deferred: settings are read by light commands that never touch a model

        return "cuda" if torch.cuda.is_available() else "cpu"

    def use_4bit(self) -> bool:
        if self.quantization == "auto":
            return self.resolved_device() == "cuda"
        return self.quantization == "4bit"
