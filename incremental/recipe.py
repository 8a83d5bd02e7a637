"""Fit the training recipe to the batch: a batch the parent finds new trains with more replay and epochs.

Screening tells, row by row, which new rows the parent finds new (novelty: an NLL far above its NLL on
unseen trusted rows of the type). When enough of the batch is new, a new domain or corrections written
in another style, the run raises replay and epochs to `RunConfig.novel_batch` (see its docstring for the
measurements); otherwise it trains as configured. Pure: no I/O, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

from incremental.config import RunConfig

__all__ = ["FittedRecipe", "fit_recipe"]


@dataclass(frozen=True)
class FittedRecipe:
    config: RunConfig  # the run config the run trains with
    novel_rows: int | None  # new train rows the parent finds new; None: not measured
    new_rows: int  # new train rows, after screening
    applied: bool  # True: the novel-batch recipe raised replay or epochs

    @property
    def description(self) -> str:
        """One line for the log and the manifest: which recipe, and why."""
        if self.novel_rows is None:
            return "configured (novelty not measured: screening is off, or the parent has too few unseen trusted rows)"
        share = f"{self.novel_rows} of {self.new_rows} new train rows are new to the parent"
        if not self.applied:
            return f"configured ({share})" if self.new_rows else "configured"
        data, train = self.config.data, self.config.train
        return (
            f"novel batch ({share}, at least {self.config.novel_batch.min_novel_share:.0%}): replay ratio "
            f"{data.replay_ratio:g} (at least {data.min_replay_rows} rows), {train.epochs:g} epochs"
        )


def fit_recipe(config: RunConfig, novel_rows: int | None, new_rows: int) -> FittedRecipe:
    """The run config for a batch of `new_rows` new train rows, `novel_rows` of them new to the parent (None:
    novelty was not measured, so the batch trains as configured).

    A novel batch gets `config.novel_batch`'s replay and epochs where they are higher than the configured
    ones; a batch under its `min_novel_share`, or any batch with the recipe disabled, keeps `config`."""
    if novel_rows is not None and not 0 <= novel_rows <= new_rows:
        raise ValueError(f"fit_recipe: novel_rows must be between 0 and new_rows ({new_rows}), got {novel_rows}")
    recipe = config.novel_batch
    if novel_rows is None or not recipe.enabled or new_rows == 0 or novel_rows < recipe.min_novel_share * new_rows:
        return FittedRecipe(config, novel_rows, new_rows, applied=False)
    data = config.data.model_copy(
        update={
            "replay_ratio": max(config.data.replay_ratio, recipe.replay_ratio),
            "min_replay_rows": max(config.data.min_replay_rows, recipe.min_replay_rows),
        }
    )
    train = config.train.model_copy(update={"epochs": max(config.train.epochs, recipe.epochs)})
    fitted = config.model_copy(update={"data": data, "train": train})
    return FittedRecipe(fitted, novel_rows, new_rows, applied=fitted != config)
