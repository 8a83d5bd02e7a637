"""Token-weighted negative log-likelihood of target texts (an `evaluate` metric, loaded by path)."""

import datasets
import evaluate

_DESCRIPTION = """
Mean negative log-likelihood per target token, in nats, over a set of examples: the sum of every
example's target-token NLL divided by the total number of target tokens (never a mean of
per-example means, which would over-weight short targets). Lower is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum: per example, the summed NLL (nats) of its target tokens under the model.
    n_tokens: per example, how many target tokens were scored.
Returns:
    target_nll: sum(nll_sum) / sum(n_tokens); None when no token was scored.
    n_examples: number of examples.
    n_tokens: total target tokens.
"""


class TargetNll(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, n_tokens):
        total_tokens = int(sum(n_tokens))
        value = float(sum(nll_sum)) / total_tokens if total_tokens else None
        return {"target_nll": value, "n_examples": len(nll_sum), "n_tokens": total_tokens}
