"""What users receive, per artifact type: do a version's greedy generations parse, and do they name the
right things?

Generates through the one decoder (`scoring.generate_greedy`, the function serving uses), so these
numbers are what a user of that version is served. Validity is the share of generations that parse as
their type (`artifacts.check_artifact`); content F1 compares the entity and field names a generation
declares with those of the right artifact. The demo's story and `benchmarks/learning_curve.py` score
versions on fresh notes with it. Knows nothing about gates, runs or the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from incremental.artifacts import check_artifact, content_f1
from incremental.scoring import generate_greedy
from incremental.synthetic import ARTIFACT_TYPES, MeetingCase, generate_cases

__all__ = ["TypeQuality", "fresh_cases", "quality_by_type", "score_generations"]


@dataclass(frozen=True)
class TypeQuality:
    """One artifact type's (or all types', `artifact_type='all'`) generation quality on `n` notes."""

    artifact_type: str
    n: int
    validity: float  # share of generations that parse as their type
    content_f1: float  # mean F1 of declared names against the right artifact's


def fresh_cases(per_type: int, seed: int, *, new_domain: bool = False) -> list[MeetingCase]:
    """`per_type` synthetic meeting notes of each artifact type, with their right artifacts.

    Pass a seed no feedback was drawn from: notes a version trained on would measure memory, not skill.
    """
    cases: list[MeetingCase] = []
    for offset, artifact_type in enumerate(ARTIFACT_TYPES):
        cases += generate_cases(per_type, seed * 7 + offset, (artifact_type,), new_domain=new_domain)
    return cases


def score_generations(cases: Sequence[MeetingCase], generations: Sequence[str]) -> dict[str, TypeQuality]:
    """{artifact type: quality} of `generations` (one per case, in order), plus 'all' pooled over types."""
    if len(cases) != len(generations):
        raise ValueError(f"generations: {len(generations)} texts for {len(cases)} cases; pass one generation per case")
    valid: dict[str, list[float]] = {}
    f1: dict[str, list[float]] = {}
    for case, text in zip(cases, generations):
        got = check_artifact(case.artifact_type, text)
        reference = check_artifact(case.artifact_type, case.artifact).names
        for key in (case.artifact_type, "all"):
            valid.setdefault(key, []).append(float(got.valid))
            f1.setdefault(key, []).append(content_f1(got.names, reference))
    return {
        key: TypeQuality(key, len(valid[key]), sum(valid[key]) / len(valid[key]), sum(f1[key]) / len(f1[key]))
        for key in [*(t for t in ARTIFACT_TYPES if t in valid), "all"]
        if key in valid
    }


def quality_by_type(
    model, tokenizer, cases: Sequence[MeetingCase], *, prompt_layout: int, max_new_tokens: int = 256, batch_size: int = 8
) -> dict[str, TypeQuality]:
    """Greedy generations of a loaded model (prompted in its version's `prompt_layout`) for every case, scored
    per type (see `score_generations`).
    The texts do not depend on `batch_size` (tests/integration/test_serving.py); larger is faster on CPU."""
    prompts = [(c.artifact_type, c.notes) for c in cases]
    texts = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, prompt_layout=prompt_layout, batch_size=batch_size
    )
    return score_generations(cases, texts)
