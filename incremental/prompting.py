"""The prompt layouts shared by training, evaluation, generation and the embedded base's pretraining.

Knows nothing about tokenizers: it turns (task, notes) into text. The target follows the prompt
directly and ends with the tokenizer's end-of-sequence token.

A layout is part of what an adapter learned: a lineage keeps the layout its first version was
trained with (the manifest records it as `prompt_layout`), so adapters trained before a newer
layout existed keep reading the prompts they were trained on. A first version takes the setting
`INCREMENTAL_PROMPT_LAYOUT` (default `LATEST_LAYOUT`).

- Layout 1 names the task in the first line only, far from where the artifact starts. The embedded
  base is pretrained with it (changing that would rebuild every cached base).
- Layout 2 (the latest) names it after the notes, right before `### Output:`. With the task only at
  the top, a small learner swapped artifact types night to night (ERDs written for prototype
  requests): on the embedded base, after three clean nights the weakest type was 0.00 valid in each
  of 3 seeds in layout 1 and 0.73 to 0.87 in layout 2 (BENCHMARKS.md, prompt layout).
"""

from __future__ import annotations

ARTIFACT_TYPES = ("erd", "api", "prototype")

PROMPT_LAYOUTS = (1, 2)
LATEST_LAYOUT = 2


def build_prompt(task: str, notes: str, *, prompt_layout: int) -> str:
    """The text a model of layout `prompt_layout` sees before it writes the artifact for `task`."""
    if prompt_layout == 1:
        return f"### Task: {task}\n### Notes:\n{notes.strip()}\n### Output:\n"
    if prompt_layout == 2:
        return f"### Notes:\n{notes.strip()}\n### Task: {task}\n### Output:\n"
    raise ValueError(f"prompt_layout={prompt_layout!r}: expected one of {PROMPT_LAYOUTS}")
