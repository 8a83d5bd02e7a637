"""Hostile text, generated: control characters, NUL, lone surrogates, U+2028, RTL and emoji, SQL,
template syntax and Rich markup, through every way in (add, JSONL, CSV, Parquet), the dataset
encoder and the CLI commands that print user data. Each case ends one of two ways: one clear
refusal naming the field (exit code 2 on the CLI, nothing stored), or the text stored, read back
byte for byte and printed without a traceback, without markup eaten and without raw terminal controls.

Real DuckDB files and a tokenizer trained in-process on a few strings; no model, no network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from rich.text import Text
from typer.testing import CliRunner

from cli.main import _clip, _safe, app, console
from incremental.errors import InvalidFeedbackError
from incremental.feedback import FeedbackStore
from incremental.feedback.ingest import MAX_CLOCK_SKEW, MAX_FIELD_BYTES
from incremental.prompting import LATEST_LAYOUT

from conftest import write_feedback_file, feedback_row, ids_in

# Few examples each: the file runs in well under a minute; every example opens a real DuckDB file.
FEW = settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

PIECES = (
    "\x00", "\x07", "\x08", "\x1b[2J", "\x1b]0;owned\x07", "\x7f", "\x9b", "\r", "\r\n", "\n", "\t", "\x0b", "\x0c",
    "\u2028", "\u2029", "\x85", "\ufeff", "\u200b", "\u202e", "\u2066", "שלום עולם", "مرحبا", "👩‍👩‍👧", "🙂", "𝛑", "ü",
    "'); DROP TABLE feedback; --", '"; DELETE FROM feedback; --', "' OR '1'='1", "$1", "?", "%s", "NULL", "null",
    "{{ config }}", "{% for x in y %}", "{#", "${HOME}", "[bold]", "[/x]", "[/]", "[red]boom[/red]", "\\", "\\[x]",
    "[", "]", ",", '"', "'", "$.a[0]", "\\u0000", "\\ud800", " ", "\u3000", "<s>", "</s>", "x" * 5000,
)  # fmt: skip
# Text as a user or a file could send it (no lone surrogates: a Python str with one cannot be UTF-8).
hostile = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)), min_size=1, max_size=6).map("".join)
# What a terminal would act on; the CLI must show these escaped.
TERMINAL_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
runner = CliRunner()


def fresh_store(folder: Path) -> FeedbackStore:
    store = FeedbackStore(folder / "feedback.duckdb", lock_timeout_s=5.0)
    store.init()
    return store


def all_rows(store: FeedbackStore) -> list[tuple]:
    con = duckdb.connect(str(store.path), read_only=True)
    try:
        return con.execute("SELECT * FROM feedback ORDER BY id").fetchall()
    finally:
        con.close()


def visible(text: str) -> bool:
    """Whether the store's 'not empty or only whitespace' rule accepts it (Python's notion of whitespace)."""
    return bool(text.strip())


def read_back(store: FeedbackStore, row_id: str) -> dict:
    return store.rows("tiny", [row_id]).to_pylist()[0]


write_file = write_feedback_file


@contextmanager
def folder():
    with tempfile.TemporaryDirectory(prefix="hostile-") as name:
        yield Path(name)


# -- the store: add and every import format -------------------------------------------------------


@SOME
@given(prompt=hostile, output=hostile, correction=hostile, source=hostile)
@example(prompt="[/x] \x00 \ud7ff", output="{{ x }}", correction="\u2028", source="ui")
def test_add_stores_any_text_verbatim_or_names_the_field(prompt, output, correction, source):
    with folder() as tmp:
        store = fresh_store(tmp)
        row = feedback_row(prompt=prompt, output=output, correction=correction, source=source, rating="needs_improvement")
        if all(visible(text) for text in (prompt, output, correction, source)):
            back = read_back(store, store.add(row))
            assert (back["prompt"], back["rejected_output"], back["target"], back["source"]) == (prompt, output, correction, source)
        else:
            with pytest.raises(InvalidFeedbackError, match=r"feedback: field '(prompt|output|correction|source)': must not be empty"):
                store.add(row)
            assert all_rows(store) == []


@SOME
@given(fmt=st.sampled_from(["jsonl", "jsonl-ascii", "csv", "parquet"]), prompt=hostile, output=hostile)
def test_every_import_format_stores_any_text_verbatim_or_names_the_line(fmt, prompt, output):
    with folder() as tmp:
        store = fresh_store(tmp)
        path = write_file(tmp / f"in.{fmt.split('-')[0]}", [feedback_row(id="r1", prompt=prompt, output=output)], ascii_json=fmt.endswith("ascii"))
        if visible(prompt) and visible(output):
            assert store.import_file(path).stored == 1
            back = read_back(store, "r1")
            assert (back["prompt"], back["target"]) == (prompt, output)
            assert store.import_file(path).already_stored == 1  # a retry changes nothing
        else:
            line = f"{path} row 1" if fmt == "parquet" else f"{path}:{2 if fmt == 'csv' else 1}"
            with pytest.raises(InvalidFeedbackError, match=rf"{re.escape(line)}: field '(prompt|output)'"):
                store.import_file(path)
            assert all_rows(store) == []


@FEW
@given(code=st.integers(0xD800, 0xDFFF), before=st.sampled_from(["", "a", "ü", "[/x]"]), after=st.sampled_from(["", "b", "\\u0041", "🙂"]))
def test_a_lone_surrogate_escape_in_jsonl_is_refused_with_its_line(code, before, after):
    # A high half followed by anything but a low half, or a low half alone: never a pair.
    assume(not (code < 0xDC00 and after.startswith("\\udc")))
    with folder() as tmp:
        store = fresh_store(tmp)
        good = json.dumps(feedback_row(id="good"))
        bad = json.dumps(feedback_row(id="bad", prompt="@@")).replace("@@", f"{before}\\u{code:04x}{after}")
        path = tmp / "in.jsonl"
        path.write_text(good + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(InvalidFeedbackError, match=rf"{re.escape(str(path))}:2: not valid JSON: .*lone surrogate"):
            store.import_file(path)
        assert all_rows(store) == []


def test_a_surrogate_pair_escape_is_the_character_it_encodes(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "pair.jsonl"
    path.write_text(json.dumps(feedback_row(id="pair", prompt="x 🙂 y"), ensure_ascii=True) + "\n", encoding="utf-8")
    assert "\\ud83d\\ude42" in path.read_text()
    store.import_file(path)
    assert read_back(store, "pair")["prompt"] == "x 🙂 y"


@FEW
@given(field=st.sampled_from(["prompt", "output", "correction", "source"]), text=st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3), around=hostile)
def test_a_python_str_with_surrogates_is_refused_naming_the_field(field, text, around):
    with folder() as tmp:
        store = fresh_store(tmp)
        row = feedback_row(**{"rating": "needs_improvement", "correction": "fixed", field: around + text})
        with pytest.raises(InvalidFeedbackError, match=rf"^nothing was stored: feedback: field '{field}': holds the surrogate code point U\+D"):
            store.add(row)
        assert all_rows(store) == []


def test_a_text_field_holds_up_to_16_mib_of_utf8_and_no_more(store: FeedbackStore) -> None:
    at_limit = "é" * (MAX_FIELD_BYTES // 2)  # two bytes each: the limit counts bytes, not characters
    assert read_back(store, store.add(feedback_row(output=at_limit)))["target"] == at_limit
    with pytest.raises(InvalidFeedbackError, match=rf"field 'prompt': is over the limit of 16 MiB \({MAX_FIELD_BYTES} bytes"):
        store.add(feedback_row(prompt=at_limit + "x"))
    assert len(all_rows(store)) == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_file_with_a_field_over_the_limit_is_refused_naming_line_and_field(store: FeedbackStore, tmp_path: Path, suffix: str) -> None:
    path = write_file(tmp_path / f"big{suffix}", [feedback_row(id="ok"), feedback_row(id="big", correction="y" * (MAX_FIELD_BYTES + 1), rating="needs_improvement")])
    with pytest.raises(InvalidFeedbackError, match=r"(:3|:2| row 2): field 'correction': is over the limit of 16 MiB"):
        store.import_file(path)
    assert all_rows(store) == []


@FEW
@given(ahead=st.one_of(st.integers(-10**9, 10**9), st.integers(-120, 120).map(lambda s: s + int(MAX_CLOCK_SKEW.total_seconds()))), fmt=st.sampled_from(["api", "jsonl"]))
def test_created_at_at_most_a_day_ahead_is_stored_and_later_is_refused(ahead, fmt):
    assume(abs(ahead - MAX_CLOCK_SKEW.total_seconds()) > 5)  # not a race with the clock at the edge
    when = (datetime.now(UTC) + timedelta(seconds=ahead)).isoformat()
    with folder() as tmp:
        store = fresh_store(tmp)
        row = feedback_row(id="t", created_at=when)
        store_it = (lambda: store.add(row)) if fmt == "api" else (lambda: store.import_file(write_file(tmp / "t.jsonl", [row])))
        if ahead < MAX_CLOCK_SKEW.total_seconds():
            store_it()
            assert len(all_rows(store)) == 1
        else:
            with pytest.raises(InvalidFeedbackError, match=r"field 'created_at': is more than 1 day ahead of this machine's clock"):
                store_it()
            assert all_rows(store) == []


# -- the dataset encoder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a few strings (every byte has a token, so no text is unknown),
    in the fast-tokenizer class the project loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["### Task: erd\n### Notes:\nCustomers place orders.\n### Output:\nerDiagram", "GET /books"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@SOME
@given(notes=hostile, target=hostile, task=st.sampled_from(["erd", "api", "prototype"]), max_length=st.integers(8, 4096))
def test_encode_examples_keeps_any_text_and_masks_only_the_prompt(tokenizer, notes, target, task, max_length):
    from incremental.dataset import IGNORE_INDEX, encode_examples
    from incremental.prompting import build_prompt

    (encoded,) = encode_examples(tokenizer, [task], [notes], [target], max_length, prompt_layout=LATEST_LAYOUT)
    ids, labels = encoded.input_ids, encoded.labels
    assert len(ids) == len(labels) <= max_length
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    masked = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    assert all(label == IGNORE_INDEX for label in labels[:masked]) and labels[masked:] == ids[masked:]
    if not encoded.truncated:
        assert tokenizer.decode(ids[1:-1], clean_up_tokenization_spaces=False) == build_prompt(task, notes, prompt_layout=LATEST_LAYOUT) + target  # byte for byte


# -- the CLI: CliRunner, and one real process -----------------------------------------------------


def cli(tmp: Path, *args: str):
    environment = {"INCREMENTAL_DB_PATH": str(tmp / "feedback.duckdb"), "INCREMENTAL_MODELS_ROOT": str(tmp / "models"), "INCREMENTAL_MODEL": "tiny"}
    return runner.invoke(app, list(args), env=environment)


def shown(text: str) -> str:
    """What the terminal shows for `_safe(text)`: the text, with controls as escapes, markup as typed."""
    return Text.from_markup(_safe(text)).plain


def assert_clean(output: str) -> None:
    assert "Traceback" not in output
    assert not TERMINAL_CONTROLS.search(output), repr(output)


def assert_refused(result, *named: str) -> None:
    """Exit code 2 and one `error:` line naming each of `named`; several problems are listed one per
    line under it, and an import adds its tip line."""
    assert result.exit_code == 2, result.output
    assert_clean(result.output)
    first, *rest = result.output.rstrip("\n").split("\n")
    assert first.startswith("error: "), result.output
    assert all(name in result.output for name in named), result.output
    if len(rest) > 1 and rest[-1].startswith("To store the valid rows"):
        rest = rest[:-1]
    assert all(line.startswith("  ") for line in rest) and (not rest or first.endswith("fix these and retry:")), result.output


@contextmanager
def wide_console():
    """No folding: a table cell prints on one line, so it can be found in the output."""
    width = console.width
    console.width = 100_000
    try:
        yield
    finally:
        console.width = width


@FEW
@given(notes=hostile, output=hostile)
def test_cli_feedback_add_stores_file_text_byte_for_byte_or_refuses_in_one_line(notes, output):
    with folder() as tmp:
        (tmp / "notes.txt").write_bytes(notes.encode("utf-8"))
        (tmp / "out [bold] [x].md").write_bytes(output.encode("utf-8"))
        result = cli(tmp, "feedback", "add", "--type", "erd", "--rating", "good", "--notes", str(tmp / "notes.txt"), "--output", str(tmp / "out [bold] [x].md"))
        store = FeedbackStore(tmp / "feedback.duckdb")
        if visible(notes) and visible(output):
            assert result.exit_code == 0, result.output
            assert_clean(result.output)
            row_id = re.fullmatch(r"Stored feedback ([0-9a-f]{32}) for tiny(, rated by .+| \(rater not known\))\.\n", result.output)[1]
            back = read_back(store, row_id)
            assert (back["prompt"], back["target"], back["source"]) == (notes, output, "cli")
        else:
            assert_refused(result, "field '")
            assert all_rows(store) == []


@FEW
@given(name=hostile, prompt=hostile, fmt=st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_cli_feedback_import_prints_any_path_and_a_retry_works(name, prompt, fmt):
    # What a file name can hold; a newline in one would make a message two lines, so none here.
    name = re.sub(r"[/\x00\n]", "_", name)[:80]
    with folder() as tmp:
        try:
            path = write_file(tmp / f"in{name}{fmt}", [feedback_row(id="r1", prompt=prompt)])
        except OSError:
            assume(False)  # a name this file system refuses (too long in bytes, say)
        first = cli(tmp, "feedback", "import", str(path))
        if visible(prompt):
            assert first.exit_code == 0, first.output
            assert_clean(first.output)
            with wide_console():
                again = cli(tmp, "feedback", "import", str(path))
            assert again.exit_code == 0 and f"from {shown(str(path))}; 1 were already stored" in again.output, again.output
            assert read_back(FeedbackStore(tmp / "feedback.duckdb"), "r1")["prompt"] == prompt
        else:
            assert_refused(first, "field 'prompt'")
            assert all_rows(FeedbackStore(tmp / "feedback.duckdb")) == []


@FEW
@given(prompt=hostile, target=hostile, reason=hostile, row_id=hostile.map(lambda text: "".join(text.split())[:128]))
def test_cli_preview_held_and_status_print_stored_text_as_typed(prompt, target, reason, row_id):
    assume(visible(prompt) and visible(target) and visible(reason) and row_id)
    with folder() as tmp:
        store = fresh_store(tmp)
        train_id = ids_in("train", 1, prefix="new")[0]
        store.add_many([feedback_row(id=train_id, prompt=prompt, output=target), feedback_row(id=row_id, prompt=prompt)])
        store.mark("tiny", [row_id], "hold", reason=reason, actor="[/x]")
        with wide_console():
            preview = cli(tmp, "dataset", "preview", "--examples", "5")
            held = cli(tmp, "feedback", "held")
            status = cli(tmp, "status")
            versions = cli(tmp, "versions")
        for result in (preview, held, status, versions):
            assert result.exit_code == 0, result.output
            assert_clean(result.output)
        assert shown(_clip(prompt)) in preview.output and shown(_clip(target)) in preview.output
        assert shown(row_id) in held.output and shown(_clip(reason, 100)) in held.output
        assert "2 rows" in status.output and "1 held" in status.output
        assert "No versions of tiny yet" in versions.output
        stored = {row["id"]: row for row in store.rows("tiny", [train_id, row_id]).to_pylist()}
        assert (stored[train_id]["prompt"], stored[train_id]["target"]) == (prompt, target)


@FEW
@given(name=hostile)
@example(name="[/x]")
@example(name="^[a-z0-9][a-z0-9._-]{0,63}$")
def test_cli_names_a_bad_model_or_version_in_one_line(name):
    assume(name.strip() and name != "base" and not name.startswith("-"))
    with folder() as tmp:
        fresh_store(tmp)
        for command in (["status"], ["versions"], ["dataset", "preview"], ["feedback", "held"]):
            result = cli(tmp, *command, "--model", name)
            if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
                assert result.exit_code == 0, result.output
            else:
                assert_refused(result, "--model", shown(repr(name))[:20])
        assert_refused(cli(tmp, "versions", "--explain", name), "is not a finished version")
        assert_refused(cli(tmp, "rollback", name), "is not a finished version")


def test_a_real_process_prints_hostile_text_and_paths_without_markup_or_traceback(tmp_path: Path) -> None:
    notes = "[bold]notes[/] [/x] {{ x }} \x1b[2J שלום 🙂 \u2028 '); DROP TABLE feedback; --"
    folder_ = tmp_path / "in["
    folder_.mkdir()
    path = write_file(folder_ / "x].jsonl", [feedback_row(id=ids_in("train", 1)[0], prompt=notes), feedback_row(id="late", created_at="2999-01-01T00:00:00Z")])
    environment = {"INCREMENTAL_DB_PATH": str(tmp_path / "feedback.duckdb"), "INCREMENTAL_MODELS_ROOT": str(tmp_path / "models"), "INCREMENTAL_MODEL": "tiny"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from cli.main import main; main()", *args],
            capture_output=True, text=True, env={**os.environ, **environment}, timeout=120,
        )  # fmt: skip

    refused = run("feedback", "import", str(path))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{path}:2: field 'created_at'" in refused.stdout and "Traceback" not in refused.stdout + refused.stderr
    path.write_text(path.read_text(encoding="utf-8").split("\n")[0] + "\n", encoding="utf-8")
    for attempt in ("Imported 1 rows", "Imported 0 rows"):  # a retry works: the first print did not crash after the commit
        done = run("feedback", "import", str(path))
        assert done.returncode == 0 and f"{attempt} from {path}" in done.stdout, done.stdout + done.stderr
    preview = run("dataset", "preview")
    assert preview.returncode == 0 and "Traceback" not in preview.stdout + preview.stderr
    assert "[bold]notes[/] [/x] {{ x }} \\x1b[2J" in preview.stdout and "\x1b" not in preview.stdout
    assert read_back(FeedbackStore(tmp_path / "feedback.duckdb"), ids_in("train", 1)[0])["prompt"] == notes
