"""What users receive, scored per type: validity and content F1 of generations against the right artifacts."""

import pytest

from incremental.quality import fresh_cases, score_generations
from incremental.synthetic import generate_cases


def test_fresh_cases_have_every_type_in_equal_numbers_and_differ_by_seed():
    cases = fresh_cases(5, seed=9000)
    assert [c.artifact_type for c in cases].count("erd") == 5 and {c.artifact_type for c in cases} == {"erd", "api", "prototype"}
    assert {c.notes for c in cases}.isdisjoint({c.notes for c in fresh_cases(5, seed=9001)})
    assert fresh_cases(5, seed=9000) == cases  # deterministic: a benchmark's notes are the same every run


def test_the_right_artifacts_score_one_and_garbage_scores_zero_per_type():
    cases = fresh_cases(4, seed=1)
    perfect = score_generations(cases, [c.artifact for c in cases])
    assert set(perfect) == {"erd", "api", "prototype", "all"}
    assert all(q.validity == 1.0 and q.content_f1 == 1.0 for q in perfect.values())
    assert perfect["all"].n == 12 and perfect["erd"].n == 4

    # Prototypes right, the rest garbage: the pool hides what one type shows.
    mixed = score_generations(cases, [c.artifact if c.artifact_type == "prototype" else "not an artifact" for c in cases])
    assert (mixed["prototype"].validity, mixed["erd"].validity, mixed["api"].content_f1) == (1.0, 0.0, 0.0)
    assert mixed["all"].validity == pytest.approx(1 / 3)


def test_another_cases_artifact_parses_but_names_the_wrong_things():
    cases = generate_cases(6, seed=3, artifact_types=("erd",))
    swapped = [cases[(i + 1) % len(cases)].artifact for i in range(len(cases))]
    quality = score_generations(cases, swapped)["erd"]
    assert quality.validity == 1.0 and quality.content_f1 < 0.5


def test_one_generation_per_case_or_a_clear_error():
    with pytest.raises(ValueError, match="generations: 1 texts for 3 cases"):
        score_generations(fresh_cases(1, seed=2), ["x"])
