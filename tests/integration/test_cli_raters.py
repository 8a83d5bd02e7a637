"""`--rater` on the command line, on a real DuckDB file: who `feedback add` and `rate` record (the
option, INCREMENTAL_RATER, the login name), `feedback held` in groups with the commands that decide
each group, `release`/`exclude` by version and rater, and what `status` says about held rows."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import _ago, app
from incremental.feedback import FeedbackStore, Generation

from conftest import feedback_row

pytestmark = pytest.mark.integration
runner = CliRunner()
V2 = "v2_20250102_000000"
V3 = "v3_20250103_000000"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FeedbackStore:
    """The store the CLI uses here: no model, no version tree; the login name is 'carla'."""
    monkeypatch.setenv("INCREMENTAL_DB_PATH", str(tmp_path / "feedback.duckdb"))
    monkeypatch.setenv("INCREMENTAL_MODELS_ROOT", str(tmp_path / "finetuned_models"))
    monkeypatch.setenv("INCREMENTAL_MODEL", "tiny")
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):  # getpass reads the first that is set
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LOGNAME", "carla")
    created = FeedbackStore(tmp_path / "feedback.duckdb")
    created.init()
    return created


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    return result.output


def raters(store: FeedbackStore) -> dict[str, str | None]:
    with duckdb.connect(str(store.path), read_only=True) as con:
        return dict(con.execute("SELECT id, rater FROM feedback").fetchall())


def held_ids(store: FeedbackStore) -> set[str]:
    return {row_id for group in store.held_groups("tiny") for row_id in group.ids}


# -- who rated ----------------------------------------------------------------------------------


def test_feedback_add_records_the_option_else_incremental_rater_else_the_login_name(
    store: FeedbackStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("We track books.")
    add = ["feedback", "add", "--type", "erd", "--rating", "good", "--notes", str(tmp_path / "notes.txt"), "--output"]

    def added(name: str, *more: str) -> str:
        (tmp_path / name).write_text(f"erDiagram {name}")
        output = invoke(*add, str(tmp_path / name), *more)
        return output.split()[2]

    assert raters(store) == {}
    by_login = added("a.md")
    by_option = added("b.md", "--rater", " ana ")
    unknown = added("c.md", "--rater", "-")
    monkeypatch.setenv("INCREMENTAL_RATER", "bob")
    by_setting = added("d.md")
    assert raters(store) == {by_login: "carla", by_option: "ana", unknown: None, by_setting: "bob"}

    monkeypatch.setenv("INCREMENTAL_RATER", "bob\nbob")
    (tmp_path / "e.md").write_text("erDiagram E")
    error = refused(*add, str(tmp_path / "e.md"))
    assert "INCREMENTAL_RATER" in error and "field 'rater'" in error and "--rater NAME" in error
    error = refused(*add, str(tmp_path / "e.md"), "--rater", "x" * 129)
    assert "field 'rater': is longer than 128 characters" in error
    assert len(raters(store)) == 4


def test_rate_records_who_rated(store: FeedbackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    made = [Generation(model="tiny", version=None, artifact_type="erd", notes=f"notes {n}", output="erDiagram") for n in range(2)]
    for generation in made:
        store.record_generation(generation)
    assert "rated by ana." in invoke("rate", made[0].id, "--good", "--rater", "ana")
    monkeypatch.setenv("INCREMENTAL_RATER", "bob")
    assert "rated by bob." in invoke("rate", made[1].id, "--good")
    assert raters(store) == {made[0].id: "ana", made[1].id: "bob"}


# -- held rows in groups ------------------------------------------------------------------------


@pytest.fixture
def held(store: FeedbackStore) -> FeedbackStore:
    """Screening held ana's and bob's rows with V2 (two rules for ana); the gate held a V3 batch of
    ana's and unrated rows; ana held one row by hand; one more of ana's rows is not held."""
    rows = {"a": "ana", "b": "bob", "u": None}
    store.add_many([feedback_row(id=f"{key}{n}", prompt=f"notes of {key}{n}", rater=rater) for key, rater in rows.items() for n in range(4)])
    store.mark("tiny", ["a0", "a1", "b0"], "hold", reason="format: no erDiagram line", actor="screening", version=V2)
    store.mark("tiny", ["a2"], "hold", reason="ungrounded: names ORDER", actor="screening", version=V2)
    store.mark("tiny", ["u0", "u1", "b1"], "hold", reason=f"batch of rejected {V3}: target_nll worse", actor="gate", version=V3)
    store.mark("tiny", ["u2"], "hold", reason="checking", actor="ana")
    return store


def test_feedback_held_groups_rows_with_a_sample_and_the_commands_that_decide_them(held: FeedbackStore) -> None:
    text = invoke("feedback", "held")
    assert text.startswith("8 held rows of tiny in 6 groups, 0 excluded; the oldest was held under a minute ago.")
    assert "2 held by screening with v2_20250102_000000, rated by ana, rule format; oldest held under a minute ago" in text
    assert "2 held by gate with v3_20250103_000000, rater not known, rule batch of rejected v3_20250103_000000" in text
    assert "e.g. a0 (erd): format: no erDiagram line" in text and "notes:  notes of a0" in text
    # ana has two groups with V2, so her commands name the rule; bob and the unrated rows need no rule.
    assert f"release: incremental feedback release --version {V2} --rater ana --rule format\n" in text
    assert f"exclude: incremental feedback exclude --version {V2} --rater ana --rule ungrounded\n" in text
    assert f"release: incremental feedback release --version {V3} --rater -\n" in text
    assert "release: incremental feedback release --ids u2\n" in text  # a hold without a version

    document = json.loads(invoke("feedback", "held", "--json"))
    groups = held.held_groups("tiny")
    assert (document["held"], document["excluded"], len(document["groups"])) == (8, 0, 6)
    assert [(g["actor"], g["version"], g["rater"], g["rule"], g["ids"]) for g in document["groups"]] == [
        (g.actor, g.version, g.rater, g.rule, list(g.ids)) for g in groups
    ]
    assert document["groups"][0]["sample"] == {
        "id": "a0", "artifact_type": "erd", "reason": "format: no erDiagram line", "notes": "notes of a0",
        "target": feedback_row()["output"],
    }  # fmt: skip

    shown = invoke("feedback", "held", "--limit", "2")
    assert shown.count("release: ") == 2 and "... and 4 more groups (--limit 6 shows them all)." in shown
    assert "--model tiny --version" in invoke("feedback", "held", "--model", "tiny")


def test_each_printed_command_releases_or_excludes_exactly_its_group(held: FeedbackStore) -> None:
    document = json.loads(invoke("feedback", "held", "--json"))
    for index, group in enumerate(document["groups"]):
        before = held_ids(held)
        command = group["exclude_command" if index % 2 else "release_command"]
        words = shlex.split(command)
        assert words[:2] == ["incremental", "feedback"]
        assert f"of {group['count']} rows" in invoke(*words[1:], "--by", "dana")
        assert before - held_ids(held) == set(group["ids"]), command
    assert held_ids(held) == set()
    excluded = {m.feedback_id for m in held.marks("tiny") if m.action == "exclude"}
    assert excluded == {row_id for i, g in enumerate(document["groups"]) if i % 2 for row_id in g["ids"]}


def test_release_by_version_and_rater_picks_only_that_raters_rows(held: FeedbackStore) -> None:
    assert "Released 1 of 1 rows" in invoke("feedback", "release", "--version", V3, "--rater", "bob", "--by", "dana")
    assert held_ids(held) == {"a0", "a1", "a2", "b0", "u0", "u1", "u2"}
    assert held.marks("tiny", ["b1"])[-1].version == V3  # the release names the version, like --version alone

    assert "Excluded 2 of 2 rows" in invoke("feedback", "exclude", "--version", V3, "--rater", "-")
    assert "Released 3 of 3 rows" in invoke("feedback", "release", "--rater", "ana")  # every version's, not u2 (unrated)
    assert held_ids(held) == {"b0", "u2"}
    assert "Released 1 of 1 rows" in invoke("feedback", "release", "--version", V2)  # --version alone, as before

    assert "no held rows match" in refused("feedback", "release", "--version", V2, "--rater", "ana")
    assert "give it alone" in refused("feedback", "release", "--ids", "u2", "--rater", "ana")
    assert "give --ids a,b,c, or pick held rows" in refused("feedback", "exclude")
    assert held_ids(held) == {"u2"}


def test_status_says_how_many_rows_wait_and_for_how_long(held: FeedbackStore) -> None:
    text = invoke("status")
    assert "8 rows held, oldest under a minute ago; see `incremental feedback held`" in text
    document = json.loads(invoke("status", "--json"))
    oldest = min(group.oldest_held_at for group in held.held_groups("tiny"))
    assert document["held"] == {"rows": 8, "groups": 6, "oldest_held_at": oldest.isoformat()}
    invoke("feedback", "exclude", "--rater", "ana")
    invoke("feedback", "release", "--version", V2)
    invoke("feedback", "release", "--version", V3)
    invoke("feedback", "release", "--ids", "u2")
    assert "rows held" not in invoke("status")
    assert json.loads(invoke("status", "--json"))["held"] == {"rows": 0, "groups": 0, "oldest_held_at": None}


def test_ago_says_the_largest_whole_unit() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2025, 1, 10, tzinfo=UTC)
    assert [_ago(now - delta, now) for delta in (timedelta(seconds=5), timedelta(minutes=1), timedelta(hours=5), timedelta(days=3))] == [
        "under a minute ago", "1 minute ago", "5 hours ago", "3 days ago",
    ]  # fmt: skip
