"""The prompt layout shared by training, evaluation, generation and the embedded base's pretraining.

Knows nothing about tokenizers: it turns (task, notes) into text. The target follows the prompt
directly and ends with the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

ARTIFACT_TYPES = ("erd", "api", "prototype")


def build_prompt(task: str, notes: str) -> str:
    """The text a model sees before it writes the artifact for `task` ('erd', 'api', ...)."""
    return f"### Task: {task}\n### Notes:\n{notes.strip()}\n### Output:\n"
