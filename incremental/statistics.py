"""Paired statistics for the gate: a seeded bootstrap interval of a candidate-minus-parent difference.

Every gated metric here is a weighted mean of per-example values (per-token NLL weighted by target
tokens, per-example validity weighted by one, ...), so a paired difference is the weighted mean of
per-example differences, resampled by example. Pure numpy; knows nothing about models or policies.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedInterval", "binomial_tail", "paired_bootstrap", "seed_for", "weighted_mean"]


@dataclass(frozen=True)
class PairedInterval:
    """Weighted means of candidate and parent on the same examples, and the interval of their difference."""

    n: int
    candidate: float
    parent: float
    difference: float  # candidate - parent, on all examples
    low: float  # lower bound of the difference's interval
    high: float  # upper bound
    confidence: float


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = float(np.sum(weights))
    return float(np.dot(values, weights) / total) if total > 0 else float("nan")


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how surprising k flagged rows of n are if each is flagged with probability p."""
    if not 0 <= k <= n or not 0.0 < p < 1.0:
        raise ValueError(f"binomial_tail needs 0 <= k <= n and 0 < p < 1, got k={k}, n={n}, p={p}")
    below = sum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(k))
    return max(0.0, 1.0 - below)


def seed_for(*parts: str) -> int:
    """A bootstrap seed from strings (snapshot hash, metric, slice): the same verdict every time."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def paired_bootstrap(
    candidate: np.ndarray,
    parent: np.ndarray,
    weights: np.ndarray,
    *,
    seed: int,
    confidence: float = 0.9,
    resamples: int = 2000,
) -> PairedInterval:
    """Percentile interval of weighted_mean(candidate) - weighted_mean(parent), resampling examples.

    Two-sided at `confidence`: a non-inferiority test that reads only the upper (or lower) bound
    then holds at (1 + confidence) / 2, i.e. 95 % one-sided for the default 0.9. Resamples whose
    weights sum to zero are dropped. Needs at least one example with positive weight.
    """
    candidate, parent, weights = (np.asarray(a, dtype=np.float64) for a in (candidate, parent, weights))
    if not (candidate.shape == parent.shape == weights.shape) or candidate.ndim != 1:
        raise ValueError(
            f"candidate, parent and weights must be 1-D arrays of one length, got {candidate.shape}, {parent.shape}, {weights.shape}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1")
    n = candidate.size
    if n == 0 or float(weights.sum()) <= 0:
        raise ValueError("no examples with positive weight to compare")
    difference = candidate - parent
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    sampled_weights = weights[index]
    totals = sampled_weights.sum(axis=1)
    keep = totals > 0
    means = (difference[index] * sampled_weights).sum(axis=1)[keep] / totals[keep]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedInterval(
        n=n,
        candidate=weighted_mean(candidate, weights),
        parent=weighted_mean(parent, weights),
        difference=weighted_mean(difference, weights),
        low=float(low),
        high=float(high),
        confidence=confidence,
    )
