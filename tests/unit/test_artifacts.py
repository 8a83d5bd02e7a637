"""Artifact checks: every synthetic artifact is well-formed and names what it was rendered from; broken ones say why."""

from __future__ import annotations

import random

import pytest

from incremental import synthetic
from incremental.artifacts import ArtifactCheck, check_artifact, content_f1
from incremental.prompting import ARTIFACT_TYPES

N_CASES, SEED = 60, 7
CASES = synthetic.generate_cases(N_CASES, seed=SEED)
# generate_cases draws its specs with _draw(n, seed, "cases") before picking types, so these are the same specs.
SPECS = [spec for spec, _, _ in synthetic._draw(N_CASES, SEED, "cases")]


def expected_names(spec) -> set[str]:
    """The entity and attribute names a spec's ERD and OpenAPI artifacts declare."""
    names = {e.name.lower() for e in spec.entities}
    names |= {f"{e.name.lower()}.{a}" for e in spec.entities for a in e.attributes}
    return names


def render(spec, artifact_type: str) -> str:
    return synthetic._RENDERERS[artifact_type](spec)


def entities(names: frozenset[str]) -> set[str]:
    return {name for name in names if "." not in name}


def test_cases_are_the_drawn_specs():
    assert [render(spec, case.artifact_type) for spec, case in zip(SPECS, CASES)] == [case.artifact for case in CASES]


@pytest.mark.parametrize("index", range(N_CASES))
def test_every_generated_case_is_valid_and_names_its_spec(index):
    case, spec = CASES[index], SPECS[index]
    check = check_artifact(case.artifact_type, case.artifact)
    assert check == ArtifactCheck(True, None, check.names)
    expected = expected_names(spec)
    if case.artifact_type == "prototype":
        # A form on the "many" side of a relation also has a <select name="{source}_id">.
        expected |= {f"{r.target.lower()}.{r.source.lower()}_id" for r in spec.relations if r.many}
    assert check.names == expected


@pytest.mark.parametrize("index", range(N_CASES))
def test_one_spec_names_the_same_entities_in_every_format(index):
    spec = SPECS[index]
    checks = {t: check_artifact(t, render(spec, t)) for t in ARTIFACT_TYPES}
    assert all(c.valid for c in checks.values()), checks
    entity_sets = {t: entities(c.names) for t, c in checks.items()}
    assert entity_sets["erd"] == entity_sets["api"] == entity_sets["prototype"] == {e.name.lower() for e in spec.entities}
    assert checks["erd"].names == checks["api"].names == expected_names(spec)


def test_content_f1():
    assert content_f1(frozenset(), frozenset()) == 1.0
    assert content_f1(frozenset({"book"}), frozenset()) == 0.0
    assert content_f1(frozenset(), frozenset({"book"})) == 0.0
    assert content_f1(frozenset({"book", "book.title"}), frozenset({"book"})) == pytest.approx(2 / 3)
    for case in CASES:
        names = check_artifact(case.artifact_type, case.artifact).names
        assert content_f1(names, names) == 1.0


@pytest.mark.parametrize("artifact_type", ARTIFACT_TYPES)
def test_content_f1_of_two_different_specs_is_below_one(artifact_type):
    first = SPECS[0]
    other = next(s for s in SPECS[1:] if {e.name for e in s.entities} != {e.name for e in first.entities})
    a, b = (check_artifact(artifact_type, render(s, artifact_type)) for s in (first, other))
    assert a.valid and b.valid
    assert content_f1(a.names, b.names) < 1.0


ERD = "erDiagram\n  Member ||--o{ Book : borrows\n  Book {\n    string title\n    int year\n  }"
API = render(SPECS[0], "api")
JUNK = random.Random(0).randbytes(400).decode("latin-1")

INVALID = [
    ("erd", "truncated, block open", "erDiagram\n  Book {\n    string title"),
    ("erd", "attribute outside a block", "erDiagram\n  Book {\n  }\n  string title"),
    ("erd", "no erDiagram header", "  Book {\n    string title\n  }"),
    ("erd", "stray closing brace", "erDiagram\n  }"),
    ("erd", "block inside a block", "erDiagram\n  Book {\n  Member {\n  }\n  }"),
    ("erd", "relation without label", "erDiagram\n  Member ||--o{ Book"),
    ("erd", "header only", "erDiagram\n"),
    ("erd", "empty", ""),
    ("erd", "junk", JUNK),
    ("api", "YAML syntax error", "openapi: 3.0.0\ninfo:\n  title: x\n  version: 1\npaths: [\n"),
    ("api", "no paths", "openapi: 3.0.0\ninfo:\n  title: Shop API\n  version: 1.0.0\n"),
    ("api", "empty paths", "openapi: 3.0.0\ninfo:\n  title: Shop API\n  version: 1.0.0\npaths: {}\n"),
    ("api", "openapi 2.0", API.replace("openapi: 3.0.0", "openapi: '2.0'")),
    ("api", "swagger 2.0", API.replace("openapi: 3.0.0", "swagger: '2.0'")),
    ("api", "info without version", API.replace("  version: 1.0.0\n", "")),
    ("api", "path without slash", API.replace("  /", "  ", 1)),
    ("api", "truncated after a path", API.split("    get:")[0]),
    ("api", "not an HTTP method", API.replace("    get:", "    fetch:", 1)),
    ("api", "operation not a mapping", "openapi: 3.0.0\ninfo: {title: a, version: 1}\npaths:\n  /a:\n    get: 3\n"),
    ("api", "schemas not a mapping", API.split("components:")[0] + "components:\n  schemas: [Book]\n"),
    ("api", "a list", "- openapi: 3.0.0\n"),
    ("api", "invalid date", "openapi: 3.0.0\ndate: 2024-13-45\n"),
    ("api", "nested too deeply", "[" * 600),
    ("api", "empty", ""),
    ("api", "junk", JUNK),
    ("prototype", "unclosed form", '<form id="book">\n  <input name="title">\n'),
    ("prototype", "stray </div>", '<form id="book">\n  <input name="title">\n</form>\n</div>'),
    ("prototype", "misnested", '<form id="book"><div></form></div>'),
    ("prototype", "end tag of a void element", '<form id="book"><input name="title"></input></form>'),
    ("prototype", "form in a form", '<form id="a"><form id="b"></form></form>'),
    ("prototype", "tag cut off at the end", '<form id="book"></form>\n<for'),
    ("prototype", "no form at all", "<h1>Library</h1>\n<p>Books</p>"),
    ("prototype", "deep nesting", "<div>" * 5000),
    ("prototype", "empty", ""),
    ("prototype", "junk", JUNK),
    ("api", "an ERD", ERD),
    ("prototype", "an ERD", ERD),
    ("erd", "an OpenAPI spec", API),
    ("erd", "a prototype", render(SPECS[0], "prototype")),
    ("api", "a prototype", render(SPECS[0], "prototype")),
]


@pytest.mark.parametrize(("artifact_type", "text"), [(t, text) for t, _, text in INVALID], ids=[f"{t}: {what}" for t, what, _ in INVALID])
def test_invalid_artifacts_say_why(artifact_type, text):
    check = check_artifact(artifact_type, text)
    assert not check.valid
    assert isinstance(check.problem, str) and check.problem.strip()
    assert check.names == frozenset()


def test_problems_point_at_the_line():
    assert check_artifact("erd", "erDiagram\n  Book {\n  }\n  string title").problem.startswith("line 4: ")
    assert check_artifact("erd", "erDiagram\n  Book {\n    string title").problem.startswith("line 2: ")
    problem = check_artifact("erd", "erDiagram\n\n  what is this").problem
    assert problem == "line 3: expected 'Entity {', a relation or '}', got 'what is this'"
    assert check_artifact("api", "openapi: 3.0.0\ninfo: [\n").problem.startswith("line 3: YAML syntax error")
    assert check_artifact("prototype", '<form id="a">\n\n</div></form>').problem.startswith("line 3: stray </div>")


def test_mermaid_variants_are_accepted():
    text = (
        '\nerDiagram\n  %% a comment\n  A }o..o{ B : "may have"\n  A |o--|{ C : has\n'
        '  A {\n    varchar(20) name PK, FK "its name"\n    int *id UK\n  }\n'
    )
    check = check_artifact("erd", text)
    assert check.valid, check.problem
    assert check.names == {"a", "b", "c", "a.name", "a.id"}


def test_names_are_lower_case():
    assert check_artifact("prototype", '<FORM ID="Book"><Input Name="Title"><textarea name="Notes"></textarea></FORM>').names == {
        "book", "book.title", "book.notes",
    }
    assert check_artifact("erd", "erDiagram\n  Book {\n    string Title\n  }").names == {"book", "book.title"}


@pytest.mark.parametrize("artifact_type", ["ERD", "summary", "", None])
def test_unknown_artifact_type_raises(artifact_type):
    with pytest.raises(ValueError, match="artifact_type") as excinfo:
        check_artifact(artifact_type, ERD)
    assert all(t in str(excinfo.value) for t in ("erd", "api", "prototype"))


@pytest.mark.parametrize("artifact_type", ARTIFACT_TYPES)
def test_never_raises_on_cut_or_mangled_text(artifact_type):
    rng = random.Random(artifact_type)
    text = render(SPECS[1], artifact_type)
    mangled = ["".join(rng.choice((c, "", "<", "}", ":", "\n", "\x00")) for c in text) for _ in range(20)]
    for candidate in [text[:cut] for cut in range(0, len(text), 5)] + mangled:
        check = check_artifact(artifact_type, candidate)
        assert (check.problem is None) == check.valid
        assert check.valid or not check.names
    # A prototype cut anywhere inside its last form is never well-formed.
    if artifact_type == "prototype":
        last_form = text.rindex("<form")
        assert not any(check_artifact(artifact_type, text[:cut]).valid for cut in range(last_form + 1, len(text)))
