"""The synthetic meeting generator: deterministic, varied, artifacts that follow from their notes."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from incremental.prompting import ARTIFACT_TYPES, LATEST_LAYOUT, build_prompt
from incremental.synthetic import RELATED_TASKS, MeetingCase, generate_cases, related_task_pairs, synthetic_feedback

# A character proxy for the token caps: the embedded base's BPE averages about 4 characters per
# token on notes and 5 on the indented API YAML; these ratios are conservative. The integration
# tests check real token counts.
CHARS_PER_TOKEN = {"notes": 3.5, "erd": 3.0, "api": 4.5, "prototype": 3.5}
MAX_PROMPT_TOKENS, MAX_ARTIFACT_TOKENS, MAX_EXAMPLE_TOKENS = 110, 180, 320
FEEDBACK_KEYS = {"model", "artifact_type", "prompt", "output", "rating", "correction", "source", "generated_by"}


def entities_in(case: MeetingCase) -> list[str]:
    """Entity names an artifact declares, read back from its text."""
    if case.artifact_type == "erd":
        return re.findall(r"^  (\w+) \{$", case.artifact, re.M)
    if case.artifact_type == "api":
        return re.findall(r"^    ([A-Z]\w*):$", case.artifact, re.M)
    return [name.capitalize() for name in re.findall(r'<form id="(\w+)">', case.artifact)]


def attributes_in(case: MeetingCase) -> list[str]:
    if case.artifact_type == "erd":
        return re.findall(r"^    \w+ (\w+)$", case.artifact, re.M)
    if case.artifact_type == "api":
        return re.findall(r"^        (\w+):$", case.artifact, re.M)
    return re.findall(r'<input name="(\w+)"', case.artifact)


def test_same_seed_same_cases_and_rows():
    assert generate_cases(30, 5) == generate_cases(30, 5)
    assert related_task_pairs(30, 5, prompt_layout=1) == related_task_pairs(30, 5, prompt_layout=1)
    assert synthetic_feedback(30, 5, model="tiny") == synthetic_feedback(30, 5, model="tiny")


def test_different_seeds_give_different_notes():
    batches = [{row["prompt"] for row in synthetic_feedback(40, seed, model="tiny")} for seed in range(5)]
    assert all(len(batch) == 40 for batch in batches), "notes repeat within one call"
    union = set().union(*batches)
    assert len(union) == 200, "notes repeat across seeds"
    assert {c.notes for c in generate_cases(50, 1)}.isdisjoint({c.notes for c in generate_cases(50, 2)})


def test_notes_vary_in_phrasing_domain_and_size():
    cases = generate_cases(300, 0)
    assert len(Counter(c.notes.splitlines()[0] for c in cases)) >= 20, "too few distinct headers"
    assert len(Counter(re.sub(r"\w+", "w", c.notes.splitlines()[1]) for c in cases)) >= 4, "entity lines all look alike"
    assert len(Counter(c.notes.splitlines()[0].split()[-1] for c in cases)) >= 3
    assert Counter(c.artifact_type for c in cases).keys() == set(ARTIFACT_TYPES)
    assert {len(entities_in(c)) for c in cases} == {1, 2, 3}


@pytest.mark.parametrize("artifact_type", ARTIFACT_TYPES)
def test_artifact_follows_from_its_notes(artifact_type):
    cases = generate_cases(60, 3, artifact_types=(artifact_type,))
    assert {c.artifact_type for c in cases} == {artifact_type}
    for case in cases:
        entities, attributes = entities_in(case), attributes_in(case)
        assert 1 <= len(entities) <= 3
        notes = case.notes.lower()
        for entity in entities:
            assert entity.lower().rstrip("y") in notes, f"{entity} is not in the notes:\n{case.notes}"
        assert attributes
        for attribute in attributes:
            assert re.search(rf"\b{attribute}\b", notes), f"{attribute} is not in the notes:\n{case.notes}"


def test_artifact_syntax_per_type():
    for case in generate_cases(60, 4):
        if case.artifact_type == "erd":
            assert case.artifact.startswith("erDiagram\n")
        elif case.artifact_type == "api":
            assert case.artifact.startswith("openapi: 3.0.0\n") and "\npaths:\n" in case.artifact
        else:
            assert case.artifact.startswith("<h1>") and case.artifact.count("<form") == case.artifact.count("</form>")


def test_relations_in_notes_appear_in_erd():
    cases = [c for c in generate_cases(120, 6, artifact_types=("erd",)) if "||--" in c.artifact]
    assert cases, "no case with a relation"
    for case in cases:
        for source, verb in re.findall(r"^  (\w+) \|\|--\S+ \w+ : (\w+)$", case.artifact, re.M):
            assert source.lower() in case.notes.lower()
            verb = verb.replace("_", " ")
            base = {"has": "have", "belongs to": "belong to"}.get(verb, verb[:-2] if verb.endswith(("ches", "shes", "xes")) else verb[:-1])
            assert f" {verb} " in case.notes or f" {base} " in case.notes, (verb, case.notes)


def test_related_tasks_take_turns_and_copy_names_from_the_notes():
    pairs = related_task_pairs(60, 2, prompt_layout=1)
    headers = Counter(p.split("\n")[0] for p, _ in pairs)
    assert headers == {build_prompt(t, "x", prompt_layout=1).split("\n")[0]: 20 for t in RELATED_TASKS}
    for prompt, target in pairs:
        names = re.findall(r'(?:^ *|/|"|<h2>)([A-Za-z]+)(?::|"|</h2>|$)', target, re.M)
        names = [n for n in names if n not in ("app", "entities", "path", "fields", "relations", "none", "Entities", "Relations")]
        assert names and all(n.lower().rstrip("s")[:4] in prompt.lower() for n in names), (names, prompt)
    with pytest.raises(ValueError, match="tasks"):
        related_task_pairs(3, 0, tasks=("erd",), prompt_layout=1)


def test_summary_task_lists_what_the_notes_say():
    pairs = related_task_pairs(50, 2, tasks=("summary",), prompt_layout=1)
    assert all(p.startswith(build_prompt("summary", "x", prompt_layout=1).split("\n")[0]) for p, _ in pairs)
    for prompt, target in pairs:
        assert target.startswith("Entities:\n") and "\nRelations:\n" in target
        names = [n for n in re.findall(r"^ {2,4}(\w+)$", target, re.M) if n != "none"]
        assert names and all(name.lower() in prompt.lower() for name in names)


def test_sequence_lengths_stay_under_the_caps():
    for case in generate_cases(1000, 8):
        notes = len(build_prompt(case.artifact_type, case.notes, prompt_layout=LATEST_LAYOUT)) / CHARS_PER_TOKEN["notes"]
        artifact = len(case.artifact) / CHARS_PER_TOKEN[case.artifact_type]
        assert notes <= MAX_PROMPT_TOKENS and artifact <= MAX_ARTIFACT_TOKENS and notes + artifact <= MAX_EXAMPLE_TOKENS
    for prompt, target in related_task_pairs(300, 8, prompt_layout=1):
        assert (len(prompt) + len(target)) / CHARS_PER_TOKEN["notes"] <= MAX_EXAMPLE_TOKENS


def test_feedback_rows_shape():
    rows = synthetic_feedback(20, 1, model="tiny", source="demo")
    for row in rows:
        assert set(row) == FEEDBACK_KEYS
        assert row["model"] == "tiny" and row["source"] == "demo" and row["generated_by"] is None
        assert row["artifact_type"] in ARTIFACT_TYPES
        assert not row["prompt"].startswith("### Task"), "prompt holds the raw notes"


@pytest.mark.parametrize(("n", "good", "corrected"), [(50, 0.7, 0.2), (10, 0.5, 0.5), (7, 1.0, 0.0), (20, 0.0, 0.0)])
def test_feedback_shares_are_respected(n, good, corrected):
    rows = synthetic_feedback(n, 3, model="tiny", good_share=good, corrected_share=corrected)
    n_good = sum(r["rating"] == "good" for r in rows)
    n_corrected = sum(r["rating"] == "needs_improvement" and r["correction"] is not None for r in rows)
    n_rejected = sum(r["rating"] == "needs_improvement" and r["correction"] is None for r in rows)
    assert (n_good, n_corrected, n_rejected) == (round(n * good), round(n * corrected), n - round(n * good) - round(n * corrected))


def test_feedback_outputs_right_or_degraded():
    rows = synthetic_feedback(60, 4, model="tiny")
    right = {(c.notes, c.artifact_type): c.artifact for c in _reference_cases(rows)}
    for row in rows:
        expected = right[(row["prompt"], row["artifact_type"])]
        if row["rating"] == "good":
            assert row["output"] == expected and row["correction"] is None
        else:
            assert row["output"] != expected
            assert row["correction"] in (None, expected)


def test_poisoned_rows_are_rated_good_but_belong_to_other_notes():
    rows = synthetic_feedback(30, 9, model="tiny", poisoned=True)
    assert all(r["rating"] == "good" and r["correction"] is None for r in rows)
    right = {(c.notes, c.artifact_type): c.artifact for c in _reference_cases(rows)}
    outputs_of_notes = {row["prompt"]: right[(row["prompt"], row["artifact_type"])] for row in rows}
    for row in rows:
        assert row["output"] != outputs_of_notes[row["prompt"]]
    same_type_swaps = sum(row["output"] in {right[(r["prompt"], r["artifact_type"])] for r in rows if r is not row} for row in rows)
    assert same_type_swaps >= len(rows) - 3, "outputs should be other rows' artifacts of the same type"


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="good_share"):
        synthetic_feedback(5, 0, model="tiny", good_share=0.9, corrected_share=0.2)
    with pytest.raises(ValueError, match="artifact_types"):
        generate_cases(5, 0, artifact_types=("poem",))
    with pytest.raises(ValueError, match="n=-1"):
        generate_cases(-1, 0)


def _reference_cases(rows: list[dict]) -> list[MeetingCase]:
    """The right artifact for each row's notes, recovered by re-rendering through the public API."""
    import incremental.synthetic as synthetic

    cases = []
    for row in rows:
        spec = _spec_of(synthetic, row["prompt"])
        cases.append(MeetingCase(row["prompt"], row["artifact_type"], synthetic._RENDERERS[row["artifact_type"]](spec)))
    return cases


def _spec_of(synthetic, notes: str):
    """Parse notes back into the generator's model, independently of how it drew them."""
    domain = next(d for d in synthetic._DOMAINS if d.name in notes.splitlines()[0].lower())
    lines = [line.lstrip("-* ") for line in notes.splitlines()[1:]]
    entities = []
    for line in lines:
        for name, pool in domain.entities.items():
            words = re.findall(r"\w+", line.lower())
            if words and words[0] in (name.lower(), synthetic._plural(name.lower()), "for", "a", "an", "every", "we") and (
                name.lower() in words or synthetic._plural(name.lower()) in words
            ):
                attrs = [w for w in words if w in pool]
                if attrs and not any(v in line for v in (" many ", " one ", " several ")):
                    entities.append(synthetic._Entity(name, tuple(attrs)))
    names = [e.name for e in entities]
    relations = tuple(r for r in domain.relations if r.source in names and r.target in names)
    return synthetic._Spec(domain.name, tuple(entities), relations)


def test_new_domain_rows_use_no_name_the_default_corpus_uses():
    from incremental.artifacts import check_artifact

    def names(rows):
        return {part for row in rows for name in check_artifact(row["artifact_type"], row["output"]).names for part in name.split(".")}

    known = names(synthetic_feedback(400, 1, model="m", good_share=1.0, corrected_share=0.0))
    new = names(synthetic_feedback(400, 1, model="m", good_share=1.0, corrected_share=0.0, new_domain=True))
    assert new and not known & new


def test_restyled_artifacts_declare_the_same_names_in_another_layout():
    from incremental.artifacts import check_artifact
    from incremental.synthetic import restyle_artifact

    for i, case in enumerate(generate_cases(60, 4)):
        restyled = restyle_artifact(case.artifact_type, case.artifact, i)
        check = check_artifact(case.artifact_type, restyled)
        assert check.valid and check.names == check_artifact(case.artifact_type, case.artifact).names
        assert restyled != case.artifact


def test_corrected_feedback_rates_a_right_generation_good_and_corrects_the_rest():
    from incremental.synthetic import corrected_feedback

    cases = generate_cases(4, 5)
    rows = corrected_feedback(cases, [cases[0].artifact, "wrong", "", cases[3].artifact + "\n"], model="m", generated_by="v1_20260101_000000")
    assert [row["rating"] for row in rows] == ["good", "needs_improvement", "needs_improvement", "good"]
    assert rows[1]["correction"] == cases[1].artifact and rows[0]["correction"] is None
    assert {row["generated_by"] for row in rows} == {"v1_20260101_000000"}
    with pytest.raises(ValueError, match="one generated output per case"):
        corrected_feedback(cases, ["x"], model="m")


def test_invented_domains_use_made_up_words_only_and_render_valid_artifacts():
    """The embedded base may pretrain on invented domains (EmbeddedBaseSpec.invented_name_share): they must
    never use a word of the corpus or of the new domains, which the benchmarks keep new to the model."""
    from incremental.artifacts import check_artifact
    from incremental.synthetic import _INVENTED_DOMAINS_DRAWN, _reserved_words, invented_domains

    domains = invented_domains(_INVENTED_DOMAINS_DRAWN, 0)  # the pool generate_cases draws from
    assert domains == invented_domains(_INVENTED_DOMAINS_DRAWN, 0) and domains[:5] != invented_domains(5, 1)
    words = {d.name for d in domains} | {w.lower() for d in domains for e, attrs in d.entities.items() for w in (e, *attrs)}
    reserved = _reserved_words()
    assert {"library", "vineyard", "barrel", "vintage", "title"} <= reserved  # corpus and new-domain names alike
    assert len(words) > 5000 and not words & reserved
    cases = generate_cases(90, 2, invented_share=1.0)
    for case in cases:
        check = check_artifact(case.artifact_type, case.artifact)
        assert check.valid, (case.artifact_type, check.problems)
        declared = {n.split(".")[-1].lower().removesuffix("_id") for n in check.names}  # a prototype's <select name="x_id">
        assert declared <= words  # every declared name is invented


def test_an_invented_share_mixes_evenly_and_keeps_the_corpus_draws():
    plain = generate_cases(40, 6)
    assert generate_cases(40, 6, invented_share=0.0) == plain
    mixed = generate_cases(40, 6, invented_share=0.5)
    corpus_notes = {c.notes for c in plain}
    from_corpus = [c for c in mixed if c.notes in corpus_notes]
    assert [c.notes for c in from_corpus] == [c.notes for c in plain[:20]]  # the first draws, in order
    # spread evenly: every window of 4 holds 2 invented cases
    flags = [c.notes not in corpus_notes for c in mixed]
    assert all(sum(flags[i : i + 4]) == 2 for i in range(0, 40, 4))
    pairs = related_task_pairs(30, 6, prompt_layout=1, invented_share=1 / 3)
    def notes_of(prompt: str) -> str:  # layout 1: the notes sit between "### Notes:" and "### Output:"
        return prompt.split("### Notes:\n", 1)[1].split("\n### Output:", 1)[0]

    plain_notes = {notes_of(p) for p, _ in related_task_pairs(30, 6, prompt_layout=1)}
    assert sum(notes_of(p) not in plain_notes for p, _ in pairs) == 10
    for prompt, target in pairs:
        assert (len(prompt) + len(target)) / CHARS_PER_TOKEN["notes"] <= MAX_EXAMPLE_TOKENS


@pytest.mark.parametrize("share", [-0.01, 1.01])
def test_an_invented_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="invented_share"):
        generate_cases(10, 0, invented_share=share)
    from incremental.embedded import EmbeddedBaseSpec

    with pytest.raises(ValueError, match="invented_name_share"):
        EmbeddedBaseSpec(invented_name_share=share)


def test_an_invented_share_of_0_or_1_is_accepted():
    from incremental.embedded import EmbeddedBaseSpec

    assert len(generate_cases(10, 0, invented_share=1.0)) == 10
    assert EmbeddedBaseSpec(invented_name_share=1.0).invented_name_share == 1.0
    assert EmbeddedBaseSpec(invented_name_share=0.0).fingerprint() == EmbeddedBaseSpec().fingerprint()


def test_new_domain_and_invented_names_exclude_each_other():
    with pytest.raises(ValueError, match="new_domain and invented_share"):
        generate_cases(10, 0, new_domain=True, invented_share=0.5)
