"""Prompt layouts: layout 1 stays byte for byte what older adapters were trained on; a lineage keeps its layout."""

import json

import pytest

from incremental import layout
from incremental.prompting import LATEST_LAYOUT, PROMPT_LAYOUTS, build_prompt
from incremental.registry import Registry
from test_registry import make_version


def test_layout_1_is_the_text_older_versions_were_trained_on():
    assert build_prompt("erd", "  A member has a name.\n", prompt_layout=1) == "### Task: erd\n### Notes:\nA member has a name.\n### Output:\n"


def test_the_latest_layout_names_the_task_right_before_the_output():
    prompt = build_prompt("prototype", "A member has a name.", prompt_layout=LATEST_LAYOUT)
    assert prompt.endswith("\n### Task: prototype\n### Output:\n")
    assert prompt.startswith("### Notes:\nA member has a name.\n")


@pytest.mark.parametrize("bad", [0, 3, "2", None])
def test_an_unknown_layout_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"prompt_layout=.*expected one of \(1, 2\)"):
        build_prompt("erd", "notes", prompt_layout=bad)
    assert bad not in PROMPT_LAYOUTS


def test_base_mode_starts_a_lineage_in_the_latest_layout_and_a_manifest_without_one_reads_as_layout_1(tmp_path):
    registry = Registry(tmp_path / "finetuned_models", "tiny")
    assert registry.parent().prompt_layout == LATEST_LAYOUT
    assert registry.parent(new_lineage_layout=1).prompt_layout == 1  # INCREMENTAL_PROMPT_LAYOUT=1
    v1 = make_version(registry, None)
    path = registry.root / v1.name / layout.MANIFEST
    written = json.loads(path.read_text())
    assert written["schema_version"] == 4 and written["prompt_layout"] == 1  # make_manifest leaves it at its default
    written["prompt_layout"] = 2
    path.write_text(json.dumps(written))
    assert registry.parent().prompt_layout == 2
    # As schema 3 wrote it: no prompt_layout at all, and every version then used layout 1.
    del written["prompt_layout"]
    written["schema_version"] = 3
    path.write_text(json.dumps(written))
    assert registry.parent().prompt_layout == 1
    assert registry.parent(new_lineage_layout=2).prompt_layout == 1  # a lineage keeps its own


def test_the_layout_setting_is_checked_by_name(monkeypatch):
    from incremental.settings import Settings

    monkeypatch.setenv("INCREMENTAL_PROMPT_LAYOUT", "1")
    assert Settings().prompt_layout == 1
    monkeypatch.setenv("INCREMENTAL_PROMPT_LAYOUT", "7")
    with pytest.raises(ValueError, match="INCREMENTAL_PROMPT_LAYOUT=7: use one of 1, 2"):
        Settings()


def test_scores_of_one_layout_are_never_read_for_another_and_layout_1_keeps_its_cached_scores():
    from incremental.evaluation import generation_scorer, nll_scorer
    from incremental.modeling import Hardware
    from incremental.scoring import scorer_id

    cpu = Hardware(device="cpu", quantization="none")
    assert nll_scorer(cpu, 320, 1) != nll_scorer(cpu, 320, 2)
    assert generation_scorer(cpu, 320, 64, 1) != generation_scorer(cpu, 320, 64, 2)
    # The ids the score cache held before layouts were recorded, all of them layout 1's.
    assert nll_scorer(cpu, 320, 1) == scorer_id("nll", max_length=320, quantization="none", device="cpu")
    assert generation_scorer(cpu, 320, 64, 1) == scorer_id(
        "greedy", max_length=320, max_new_tokens=64, quantization="none", device="cpu"
    )
