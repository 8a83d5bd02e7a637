"""Prompt gain: how much a model's prediction of a target depends on its own notes (an `evaluate` metric)."""

import datasets
import evaluate

_DESCRIPTION = """
For each example, the per-token NLL of its target under ANOTHER example's notes (same task header)
minus the per-token NLL under its OWN notes, averaged with weights equal to the own target's token
count. In nats per token; higher means the model uses the meeting notes more. A model that writes
plausible artifacts while ignoring the notes scores near zero even when its target NLL is low.
"""

_KWARGS_DESCRIPTION = """
Args:
    own_nll_sum: per example, summed target NLL under its own notes.
    own_tokens: per example, target tokens scored under its own notes.
    other_nll_sum: per example, summed target NLL under another example's notes.
    other_tokens: per example, target tokens scored under the other notes.
Returns:
    prompt_gain: token-weighted mean of (other per-token NLL - own per-token NLL); None when empty.
"""


class PromptGain(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "own_nll_sum": datasets.Value("float64"),
                    "own_tokens": datasets.Value("int64"),
                    "other_nll_sum": datasets.Value("float64"),
                    "other_tokens": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, own_nll_sum, own_tokens, other_nll_sum, other_tokens):
        weighted, weight = 0.0, 0
        for own, n_own, other, n_other in zip(own_nll_sum, own_tokens, other_nll_sum, other_tokens):
            if n_own and n_other:
                weighted += (other / n_other - own / n_own) * n_own
                weight += n_own
        return {"prompt_gain": weighted / weight if weight else None}
