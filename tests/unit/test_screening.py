"""Screening rules as tables: one row's reasons from the parent's scores, and acceptance sampling per source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from incremental.config import ScreeningPolicy
from incremental.screening import ScreenedRow, hold_bad_lots, suspect_reason
from incremental.statistics import binomial_tail
from incremental.synthetic import generate_cases

POLICY = ScreeningPolicy(min_prompt_gain=0.0, max_nll_z=4.0, min_reference_rows=6)
ERD = next(case.artifact for case in generate_cases(20, 3) if case.artifact_type == "erd")
# Reference: median NLL 0.2 with a robust SD of 1.4826 * 0.05; median gain 0.15.
REF_NLL = np.array([0.15, 0.15, 0.2, 0.2, 0.2, 0.25, 0.25])
REF_GAIN = np.array([0.1, 0.12, 0.15, 0.15, 0.15, 0.2, 0.3])
SD = 1.4826 * 0.05

CASES = [
    # id, target, nll, gain, reference gains, expected phrase (None: not suspect)
    ("clean row", ERD, 0.2, 0.15, REF_GAIN, None),
    ("gain exactly at the threshold is suspect", ERD, 0.2, 0.0, REF_GAIN, "no more likely under its own notes"),
    ("gain just above the threshold is fine", ERD, 0.2, 1e-6, REF_GAIN, None),
    ("parent that does not read notes: gain rule off", ERD, 0.2, -0.5, np.array([0.0, -0.1, 0.0, 0.05, -0.02, 0.0]), None),
    ("too few reference rows: gain rule off", ERD, 0.2, -0.5, REF_GAIN[:5], None),
    ("NLL outlier", ERD, 0.2 + 4.01 * SD, 0.15, REF_GAIN, "robust SDs above"),
    ("NLL just inside the limit", ERD, 0.2 + 3.99 * SD, 0.15, REF_GAIN, None),
    ("not an ERD", "openapi: 3.0.0\npaths: {}", 0.2, 0.15, REF_GAIN, "does not parse as erd"),
]


@pytest.mark.parametrize("target,nll,gain,ref_gain,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_suspect_reason(target, nll, gain, ref_gain, phrase):
    reason = suspect_reason("erd", target, nll, gain, REF_NLL, ref_gain, POLICY)
    if phrase is None:
        assert reason is None
    else:
        assert reason is not None and phrase in reason


def test_format_rule_can_be_switched_off():
    assert suspect_reason("erd", "not an erd", 0.2, 0.15, REF_NLL, REF_GAIN, POLICY.model_copy(update={"check_format": False})) is None


def rows(source: str, n: int, flagged: int) -> list[ScreenedRow]:
    return [ScreenedRow(f"{source}-{i}", "erd", source, 0.2, 0.1, 0.0, "own reason" if i < flagged else None) for i in range(n)]


def threshold(n: int, policy: ScreeningPolicy) -> int:
    """The smallest number of suspects in n rows that holds the lot."""
    return next(k for k in range(n + 1) if binomial_tail(k, n, policy.clean_suspect_share) < policy.lot_p_value)


def test_a_lot_with_improbably_many_suspects_is_held_whole_per_source():
    k = threshold(60, POLICY)
    assert 5 < k < 15  # 60 rows at 5 %: about 3 expected
    out = {row.id: row.reason for row in hold_bad_lots(rows("import", 60, k) + rows("ui", 60, k - 1), POLICY)}
    assert all(out[f"import-{i}"] for i in range(60))
    assert out["import-0"] == "own reason" and "held with its batch from source 'import'" in out["import-59"]
    assert sum(1 for i in range(60) if out[f"ui-{i}"]) == k - 1  # one fewer: only its own suspects


def test_binomial_tail():
    assert binomial_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_tail(10, 10, 0.3) == pytest.approx(0.3**10)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)
    exact = sum(math.comb(60, i) * 0.05**i * 0.95 ** (60 - i) for i in range(9, 61))
    assert binomial_tail(9, 60, 0.05) == pytest.approx(exact)
    with pytest.raises(ValueError):
        binomial_tail(3, 2, 0.5)
