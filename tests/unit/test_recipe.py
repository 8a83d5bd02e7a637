"""Fitting the training recipe to the batch: novel batches get more replay and epochs, other nights
train as configured, and a recipe never lowers what the configuration asks for."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from incremental.config import DataSettings, NovelBatchRecipe, RunConfig, TrainSettings
from incremental.recipe import fit_recipe

DEFAULT = RunConfig()


@pytest.mark.parametrize(
    "novel,new,applied",
    [
        (0, 60, False),  # an ordinary night: nothing new to the parent
        (8, 54, False),  # the most novel clean batch measured from the demo's end state (15 %)
        (5, 24, False),  # exact corrections: 0 to 3 of 24 measured; 5 is still under a quarter
        (6, 24, True),  # exactly a quarter
        (21, 24, True),  # restyled corrections, as measured
        (54, 54, True),  # a new domain, as measured
        (0, 0, False),  # nothing left to train (the flow skips such a run before it asks)
    ],
)
def test_a_batch_is_novel_from_a_quarter_of_its_rows_new_to_the_parent(novel, new, applied):
    fitted = fit_recipe(DEFAULT, novel, new)
    assert fitted.applied is applied
    if applied:
        assert (fitted.config.data.replay_ratio, fitted.config.data.min_replay_rows, fitted.config.train.epochs) == (4.0, 256, 6.0)
        assert fitted.description.startswith(f"novel batch ({novel} of {new} new train rows are new to the parent")
        assert "replay ratio 4 (at least 256 rows), 6 epochs" in fitted.description
    else:
        assert fitted.config == DEFAULT
        assert fitted.description.startswith("configured")


def test_everything_else_in_the_run_config_is_kept():
    fitted = fit_recipe(DEFAULT, 54, 54).config
    assert fitted.model_dump(exclude={"data": {"replay_ratio", "min_replay_rows"}, "train": {"epochs"}}) == DEFAULT.model_dump(
        exclude={"data": {"replay_ratio", "min_replay_rows"}, "train": {"epochs"}}
    )
    assert fitted.data.max_replay_rows == DEFAULT.data.max_replay_rows  # the cap on cost still holds


def test_the_recipe_only_raises_what_the_configuration_asks_for():
    strong = RunConfig(data=DataSettings(replay_ratio=8.0, min_replay_rows=64), train=TrainSettings(epochs=10.0))
    fitted = fit_recipe(strong, 54, 54)
    assert (fitted.config.data.replay_ratio, fitted.config.data.min_replay_rows, fitted.config.train.epochs) == (8.0, 256, 10.0)
    assert fitted.applied  # min_replay_rows rose
    stronger = RunConfig(data=DataSettings(replay_ratio=8.0, min_replay_rows=512), train=TrainSettings(epochs=10.0))
    assert not fit_recipe(stronger, 54, 54).applied  # nothing to raise: trained as configured
    assert fit_recipe(stronger, 54, 54).config == stronger


def test_a_batch_whose_novelty_was_not_measured_trains_as_configured():
    fitted = fit_recipe(DEFAULT, None, 54)
    assert fitted.config == DEFAULT and not fitted.applied
    assert fitted.description.startswith("configured (novelty not measured")


def test_a_disabled_recipe_trains_every_batch_as_configured():
    off = RunConfig(novel_batch=NovelBatchRecipe(enabled=False))
    assert fit_recipe(off, 54, 54).config == off and not fit_recipe(off, 54, 54).applied


def test_a_fitted_config_fits_to_itself():
    # The manifest stores the fitted config; run again on the same batch it must train the same way.
    fitted = fit_recipe(DEFAULT, 54, 54).config
    assert fit_recipe(fitted, 54, 54).config == fitted
    assert RunConfig.model_validate(fitted.model_dump(mode="json")) == fitted


@pytest.mark.parametrize("novel,new", [(-1, 10), (11, 10)])
def test_impossible_counts_are_refused(novel, new):
    with pytest.raises(ValueError, match="novel_rows must be between 0 and new_rows"):
        fit_recipe(DEFAULT, novel, new)


@pytest.mark.parametrize(
    "field,value",
    [("min_novel_share", 0.0), ("min_novel_share", 1.01), ("replay_ratio", -0.1), ("replay_ratio", 10.5), ("min_replay_rows", -1), ("epochs", 0)],
)
def test_a_bad_recipe_value_names_its_field(field, value):
    with pytest.raises(ValidationError, match=field):
        RunConfig.model_validate({"novel_batch": {field: value}})
