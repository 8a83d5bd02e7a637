"""Getting feedback in and out: rows from the Python API, bulk imports of JSONL, CSV and Parquet files,
and exports to JSONL or Parquet.

Every row, whatever its way in, is staged as a table and checked by one rule set (`_RULES`, run as SQL
by DuckDB over the whole batch), then stored in one transaction. Parquet and CSV are read by DuckDB's
own readers, JSONL lines by its JSON functions; Python only splits files into lines with numpy (so an
error names the real line) and formats the first few problems. A refused batch stores nothing; with
`skip_invalid` the bad rows go to a reject file instead. Limits: a text field holds at most
MAX_FIELD_BYTES (16 MiB) of UTF-8, a created_at is at most MAX_CLOCK_SKEW (1 day) ahead of this
machine's clock, a rater is one line of at most MAX_RATER_CHARS (128) characters. Knows nothing about
lineage or training.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from incremental.errors import IncrementalError, InvalidFeedbackError
from incremental.feedback.database import MAX_LISTED_ERRORS, SPLIT_SQL, FeedbackDatabase, check_model, utcnow
from incremental.layout import MODEL_NAME, VERSION_NAME
from incremental.prompting import ARTIFACT_TYPES

IMPORT_FORMATS: tuple[str, ...] = (".csv", ".jsonl", ".ndjson", ".parquet")
EXPORT_FORMATS: tuple[str, ...] = (".jsonl", ".parquet")
# What a row gives, and the columns of the feedback table (what `export` writes). A row may name all of
# them, so an export imports again: a given split must be the one this database computes, and a given
# ingested_at is ignored: it is when this database stored the row, and it decides which rows the gate
# trusts, so no file may set it. `rater` came with schema v5: it is the table's last column, and a file
# without it still imports (rater unknown).
_V1_FIELDS = (
    "id", "model", "artifact_type", "prompt", "output", "rating", "correction", "source", "generated_by", "created_at",
)  # fmt: skip
FIELDS = (*_V1_FIELDS, "rater")
FEEDBACK_COLUMNS = (*_V1_FIELDS, "split", "ingested_at", "rater")
_CHECKED_FIELDS = (*FIELDS, "split")
_REQUIRED = ("model", "artifact_type", "prompt", "output", "rating")
# A row without an id gets one derived from these, as given, so importing a file twice stores it once;
# and from its rater when it names one, so two people's equal ratings are two rows (a file without
# raters keeps the ids it had before raters were recorded).
_CONTENT = ("model", "artifact_type", "prompt", "output", "rating", "correction", "created_at")
# A row whose id is stored is skipped when these (and created_at and rater, if it gives them) are
# equal, else refused.
_COMPARED = ("model", "artifact_type", "prompt", "output", "rating", "correction", "generated_by")
# A rater is a short name on one line (a login, an e-mail address). '-' is not one: the CLI's
# `--rater -` means "rows whose rater is not known".
MAX_RATER_CHARS = 128
NO_RATER = "-"

# Limits on what one row may carry. A text field holds at most MAX_FIELD_BYTES of UTF-8: far above any
# meeting notes or artifact (a 10 MB output is stored verbatim), low enough that one row cannot
# exhaust the memory of a run that tokenizes it. A created_at more than MAX_CLOCK_SKEW ahead of this
# machine's clock is refused: the gate's eval window keeps the most recent rows by created_at, so a
# row dated in the future would take a place in every later window and never age out.
MAX_FIELD_BYTES = 16 * 1024 * 1024
MAX_CLOCK_SKEW = timedelta(days=1)


@dataclass(frozen=True, kw_only=True)
class FeedbackInput:
    """One rated output as the Python API takes it: a typed container; the store checks it (`_RULES`).

    `source` None means the entry point's default ('api' for `add`), `created_at` None means now
    (a naive datetime is UTC), `id` None a fresh uuid4 hex, `rater` None that nobody knows who
    rated it. A rater is stored without its surrounding whitespace.
    """

    model: str
    artifact_type: str
    prompt: str
    output: str
    rating: str
    correction: str | None = None
    source: str | None = None
    generated_by: str | None = None
    created_at: datetime | str | None = None
    id: str | None = None
    rater: str | None = None  # who rated it (a login, an e-mail address); None: not known


class ExportTargetExistsError(IncrementalError, FileExistsError):
    """An export would overwrite an existing file."""


@dataclass(frozen=True)
class ImportReport:
    """What an import did: rows stored, rows already stored with the same content (skipped), blank
    lines skipped, and rows refused into `rejected_path` (only with `skip_invalid`)."""

    path: Path
    stored: int
    already_stored: int
    blank_lines: int
    rejected: int = 0
    rejected_path: Path | None = None


_FIELD_HINTS = {
    "model": "use the model's folder name: lowercase letters, digits, '.', '_' or '-' (e.g. 'tiny'); "
    "a file import can pass default_model (CLI: --model)",
    "artifact_type": f"use one of: {', '.join(ARTIFACT_TYPES)}",
    "prompt": "pass the meeting notes the output was generated from",
    "output": "pass the generated artifact that was rated",
    "rating": "use 'good' or 'needs_improvement'",
    "correction": "omit it, or give the corrected output together with rating 'needs_improvement'",
    "source": "omit it, or name where the feedback came from (e.g. 'ui')",
    "generated_by": "omit it, or give a version name like v3_20251105_160000",
    "created_at": "give an ISO 8601 time such as 2025-11-05T16:00:00Z (no offset means UTC), or omit it for now",
    "id": "omit it, or give a unique id of 1-128 characters without whitespace",
    "split": "drop it: each database decides the split from the id and its eval share",
    "rater": f"omit it (or pass null) when it is not known, or name who rated the row on one line in 1-{MAX_RATER_CHARS} "
    "characters (e.g. 'ana' or 'ana@example.com')",
}


def _too_big(field: str) -> tuple[str, str, bool]:
    """The size rule of one text field (see MAX_FIELD_BYTES); `strlen` counts UTF-8 bytes."""
    what = f"is over the limit of {MAX_FIELD_BYTES // (1024 * 1024)} MiB ({MAX_FIELD_BYTES} bytes of UTF-8) per text field; shorten it"
    return (what, f"strlen({field}) > {MAX_FIELD_BYTES}", False)


def _lit(text: str) -> str:
    """A SQL string literal (DuckDB strings have no backslash escapes; a quote is doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _full(pattern: str) -> str:
    """A Python `^...$` pattern for `regexp_full_match` (RE2 reads `(?P<name>...)` too)."""
    return _lit(pattern.removeprefix("^").removesuffix("$"))


# A character that Python's str.strip() keeps (RE2's \s is ASCII only, so the Unicode spaces are named).
_VISIBLE = _lit(r"[^\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]")
_ID_PATTERN = _lit(r"[^\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]{1,128}")
# Python's str.strip() of a text column: its leading and trailing whitespace, as _VISIBLE reads it.
_EDGE_SPACE = _lit(r"^[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]+|[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]+$")
# A control character or a line or paragraph separator: a rater is one line of plain text.
_NOT_ONE_LINE = _lit(r"[\p{Cc}\p{Zl}\p{Zp}]")
_TYPES = ", ".join(_lit(t) for t in ARTIFACT_TYPES)

# The rule set. Per field: (what is wrong, SQL that is true when it is, show the value), the first
# that holds is reported. NULL means missing (or JSON null, or an empty CSV cell); `model` and
# `source` already carry the entry point's defaults. A JSON value that is not text is caught first.
_RULES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "id": (("must be 1-128 characters without whitespace", f"NOT regexp_full_match(id_given, {_ID_PATTERN})", True),),
    "model": (
        ("is required", "model IS NULL", False),
        ("is not a model name", f"NOT regexp_full_match(model, {_full(MODEL_NAME.pattern)})", True),
    ),
    "artifact_type": (
        ("is required", "artifact_type IS NULL", False),
        ("is not an artifact type", f"artifact_type NOT IN ({_TYPES})", True),
    ),
    "prompt": (
        ("is required", "prompt IS NULL", False),
        _too_big("prompt"),
        ("must not be empty or only whitespace", f"NOT regexp_matches(prompt, {_VISIBLE})", True),
    ),
    "output": (
        ("is required", "output IS NULL", False),
        _too_big("output"),
        ("must not be empty or only whitespace", f"NOT regexp_matches(output, {_VISIBLE})", True),
    ),
    "rating": (
        ("is required", "rating IS NULL", False),
        ("is not a rating", "rating NOT IN ('good', 'needs_improvement')", True),
    ),
    "correction": (
        _too_big("correction"),
        ("must not be empty; omit it (or pass null) when there is no correction", f"NOT regexp_matches(correction, {_VISIBLE})", True),
        ("a correction is only accepted with rating 'needs_improvement', this row is rated 'good'", "correction IS NOT NULL AND rating = 'good'", False),
    ),
    "source": (
        _too_big("source"),
        ("must not be empty or only whitespace", f"NOT regexp_matches(source, {_VISIBLE})", True),
    ),
    "generated_by": (
        ("is not a version name", f"NOT regexp_full_match(generated_by, {_full(VERSION_NAME.pattern)})", True),
    ),
    # `rater` here is the given text stripped of its surrounding whitespace (see `_checked_sql`).
    "rater": (
        ("must not be empty or only whitespace", "rater = ''", True),
        (f"is longer than {MAX_RATER_CHARS} characters", f"length(rater) > {MAX_RATER_CHARS}", True),
        ("must be one line without control characters", f"regexp_matches(rater, {_NOT_ONE_LINE})", True),
        (f"is {NO_RATER!r}, which the command line reads as 'rater not known'", f"rater = {_lit(NO_RATER)}", True),
    ),
    "created_at": (
        ("is not an ISO 8601 time", "created_at_given IS NOT NULL AND created_ts IS NULL", True),
        (
            f"is more than {MAX_CLOCK_SKEW.days} day ahead of this machine's clock (check the clock of the machine that wrote it)",
            f"created_ts > $now::TIMESTAMPTZ + to_seconds({MAX_CLOCK_SKEW.total_seconds():.0f})",
            True,
        ),
    ),
    "split": (
        ("must be 'train' or 'eval'", "split_given NOT IN ('train', 'eval')", True),
        ("is not the split this database computes for this id", "split_given <> split", True),
    ),
}
# The column a rule shows as "got" where it is not the field's own name.
_GIVEN = {"id": "id_given", "created_at": "created_at_given", "split": "split_given", "rater": "rater_given"}


def _got(column: str) -> str:
    """SQL: ' (got "the value")', cut to 60 characters, JSON-quoted so newlines stay visible."""
    short = f"CASE WHEN length({column}) > 60 THEN left({column}, 57) || '...' ELSE {column} END"
    return f"' (got ' || to_json({short})::VARCHAR || ')'"


def _field_problem(field: str) -> str:
    """SQL: the problem of one field as text (NULL when there is none)."""
    hint = _lit("; " + _FIELD_HINTS[field])
    head = _lit(f"field '{field}': ")
    cases = [f"WHEN {field}__wrong IS NOT NULL THEN {head} || 'must be text, got ' || {field}__wrong || {hint}"]
    for what, condition, show in _RULES[field]:
        got = f" || {_got(_GIVEN.get(field, field))}" if show else ""
        cases.append(f"WHEN {condition} THEN {head} || {_lit(what)}{got} || {hint}")
    return f"CASE {' '.join(cases)} END"


_KNOWN_LIST = "[" + ", ".join(_lit(name) for name in FEEDBACK_COLUMNS) + "]"
_UNKNOWN_PROBLEM = (
    "list_transform(unknown, lambda k: 'field ''' || k || ''': unknown field; remove it; known fields: "
    + ", ".join(FEEDBACK_COLUMNS)
    + "')"
)


def _checked_sql(staged: str, place: Callable[[str], str], id_default: str) -> str:
    """The one rule set, as a CREATE TEMP TABLE `checked` over a staged relation.

    `staged` yields, per row: line, broken (a problem that leaves no fields to check, e.g. a line
    that is not JSON), unknown (field names), each of `_CHECKED_FIELDS` as text (NULL: missing) and
    `<field>__wrong` (a description of a JSON value that is not text). `checked` holds the effective
    row, `problems` (empty when the row may be stored) and `stored_same` (its id is stored with the
    same content: importing it again changes nothing).
    """
    wrong = ", ".join(f"{name}__wrong" for name in _CHECKED_FIELDS)
    differs = [f"CASE WHEN f.{name} IS DISTINCT FROM s.{name} THEN '{name}' END" for name in _COMPARED]
    differs.append("CASE WHEN s.created_at_given IS NOT NULL AND f.created_at IS DISTINCT FROM s.created_ts THEN 'created_at' END")
    differs.append("CASE WHEN s.rater IS NOT NULL AND f.rater IS DISTINCT FROM s.rater THEN 'rater' END")
    quoted_id = "'''' || id || ''''"
    batch_problem = f"""CASE WHEN first_line < line THEN
        CASE WHEN id_given IS NOT NULL
             THEN 'field ''id'': ' || {quoted_id} || ' is already used by ' || {place('first_line')} || '; give each row its own id'
             ELSE 'the same content as ' || {place('first_line')} || ' (a row without an id is known by its '
                  || {_lit(', '.join(_CONTENT))} || ' and rater); remove the repeat, or give each row an id'
        END END"""
    stored_problem = f"""CASE WHEN len(differs) > 0 THEN
        'field ''id'': ' || {quoted_id} || ' is already stored with a different ' || array_to_string(differs, ', ')
        || '; give this row a new id (a row without an id gets one from its content)' END"""
    problems = ", ".join([*(_field_problem(name) for name in _CHECKED_FIELDS), batch_problem, stored_problem])
    return f"""
CREATE TEMP TABLE checked AS
WITH staged AS ({staged}),
given AS (
    SELECT line, broken, unknown, {wrong},
           coalesce(model, $default_model::VARCHAR) AS model, artifact_type, prompt, output, rating, correction,
           coalesce(source, $default_source::VARCHAR) AS source, generated_by,
           created_at AS created_at_given, id AS id_given, split AS split_given,
           rater AS rater_given, regexp_replace(rater, {_EDGE_SPACE}, '', 'g') AS rater,
           -- DuckDB also casts words like 'epoch' and 'infinity'; a time must start with a date.
           CASE WHEN regexp_matches(created_at, '^\\s*\\d{{4}}-\\d{{2}}-\\d{{2}}')
                THEN TRY_CAST(created_at AS TIMESTAMPTZ) END AS created_parsed
    FROM staged
),
identified AS (
    SELECT *, CASE WHEN isfinite(created_parsed) THEN created_parsed END AS created_ts,
           CASE WHEN broken IS NULL THEN coalesce(id_given, {id_default}) END AS id
    FROM given
),
sided AS (SELECT *, {SPLIT_SQL} AS split FROM identified),
-- Ids given twice in the batch; an aggregate over two narrow columns (a window would drag the text along).
repeated AS (SELECT id, min(line) AS first_line FROM sided GROUP BY id HAVING count(*) > 1),
compared AS (
    SELECT s.*, r.first_line,
           CASE WHEN f.id IS NOT NULL THEN list_filter([{", ".join(differs)}], lambda d: d IS NOT NULL) END AS differs
    FROM sided AS s LEFT JOIN feedback AS f ON f.id = s.id LEFT JOIN repeated AS r ON r.id = s.id
)
SELECT line, id, model, artifact_type, prompt, output, rating, correction, source, generated_by, created_ts, split, rater,
       coalesce(len(differs) = 0, false) AS stored_same,
       CASE WHEN broken IS NOT NULL THEN [broken]
            ELSE list_concat({_UNKNOWN_PROBLEM}, list_filter([{problems}], lambda p: p IS NOT NULL))
       END AS problems
FROM compared
"""


_INSERT_SQL = f"""
INSERT INTO feedback ({", ".join(FEEDBACK_COLUMNS)})
SELECT id, model, artifact_type, prompt, output, rating, correction, source, generated_by,
       coalesce(created_ts, $now), split, $now, rater
FROM checked WHERE len(problems) = 0 AND NOT stored_same
"""
# The id of a file's row that has none: 32 hex digits of sha256 over its content as given (JSON, so
# no two contents read alike). The API's rows get a uuid4 hex instead: two equal ratings are two events.
_CONTENT_VALUES = ", ".join(_GIVEN.get(name, name) for name in _CONTENT)
_CONTENT_ID = (
    f"left(sha256(to_json(CASE WHEN rater IS NULL THEN [{_CONTENT_VALUES}] ELSE [{_CONTENT_VALUES}, rater] END)), 32)"
)
_RANDOM_ID = "replace(uuid()::VARCHAR, '-', '')"


def _params(sql: str, **values: Any) -> dict[str, Any]:
    """The named parameters a statement uses: DuckDB refuses ones it does not use."""
    return {name: value for name, value in values.items() if f"${name}" in sql}


# -- staging: each way in yields the relation `_checked_sql` reads --------------------------------


@dataclass(frozen=True)
class _Staged:
    sql: str  # the staged relation (see `_checked_sql`)
    place: Callable[[str], str]  # SQL naming where a row is, from an expression for its line
    blank_lines: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)


def _file_place(line: str) -> str:
    """SQL: where a file's row is: `$place` (the path and a separator, passed as a parameter like every
    value a user chose) and its line."""
    return f"($place::VARCHAR || {line})"


def _kind(json_type: str) -> str:
    return (
        f"CASE {json_type} WHEN 'OBJECT' THEN 'an object' WHEN 'ARRAY' THEN 'a list' WHEN 'BOOLEAN' THEN 'true/false' "
        "WHEN 'VARCHAR' THEN 'text' ELSE 'a number' END"
    )


_NOT_UTF8 = _lit("not UTF-8 text; save the file as UTF-8")
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): text only as the two halves of a pair.
_SURROGATE_ESCAPE = _lit(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _text_of(raw: str) -> str:
    """SQL: a record's text without its line break; bytes that are not UTF-8 show as \\xNN."""
    return (
        f"coalesce(rtrim(try(decode({raw})), chr(13) || chr(10)), "
        f"regexp_replace({raw}::VARCHAR, '(\\\\x0D)?\\\\x0A$', ''))"
    )


def _json_staged(lines: str) -> str:
    """Staged rows from `lines`: (line, body: the JSON text, NULL when not UTF-8, raw: BLOB or NULL)."""
    paths = "[" + ", ".join(_lit(f"$.{name}") for name in _CHECKED_FIELDS) + "]"
    columns = []
    for i, name in enumerate(_CHECKED_FIELDS, start=1):
        columns.append(f"CASE WHEN types[{i}] = 'VARCHAR' THEN texts[{i}] END AS {name}")
        columns.append(
            f"CASE WHEN types[{i}] NOT IN ('VARCHAR', 'NULL') "
            f"THEN {_kind(f'types[{i}]')} || ' (' || left(texts[{i}], 60) || ')' END AS {name}__wrong"
        )
    return f"""
    WITH lines AS ({lines}),
    parsed AS (
        SELECT line, body, raw,
               CASE WHEN body IS NULL THEN {_NOT_UTF8}
                    -- Valid once every surrogate escape is gone: one of them had no partner.
                    WHEN NOT json_valid(body) AND json_valid(regexp_replace(body, {_SURROGATE_ESCAPE}, 'x', 'g'))
                    THEN 'not valid JSON: a \\ud800-\\udfff escape without its pair is not text (a lone surrogate); '
                         || 'remove it, or write the character itself' || {_got("body")}
                    WHEN NOT json_valid(body) THEN 'not valid JSON; write one JSON object per line' || {_got("body")}
                    WHEN json_type(body) <> 'OBJECT'
                    THEN 'expected an object with feedback fields, not ' || {_kind("json_type(body)")} || {_got("body")}
               END AS broken
        FROM lines
    ),
    extracted AS (
        SELECT *, CASE WHEN broken IS NULL THEN json_type(body, {paths}) END AS types,
               CASE WHEN broken IS NULL THEN json_extract_string(body, {paths}) END AS texts
        FROM parsed
    )
    SELECT line, broken,
           CASE WHEN broken IS NULL THEN list_filter(json_keys(body), lambda k: NOT list_contains({_KNOWN_LIST}, k))
                ELSE []::VARCHAR[] END AS unknown,
           {", ".join(columns)},
           CASE WHEN broken IS NULL THEN body::JSON END AS record,
           CASE WHEN broken IS NOT NULL THEN coalesce(body, {_text_of("raw")}) END AS raw
    FROM extracted
    """


def _typed_staged(source: str, given: Mapping[str, str], *, line: str, broken: str = "NULL", raw: str = "NULL") -> str:
    """Staged rows from a reader's table: `given` maps the fields it has to their column expressions."""
    columns = [f"{given[name]}::VARCHAR AS {name}" if name in given else f"NULL::VARCHAR AS {name}" for name in _CHECKED_FIELDS]
    record = ", ".join(f"{_lit(name)}, {expression}" for name, expression in given.items())
    return f"""
    SELECT {line} AS line, {broken} AS broken, []::VARCHAR[] AS unknown, {", ".join(columns)},
           {", ".join(f"NULL::VARCHAR AS {name}__wrong" for name in _CHECKED_FIELDS)},
           CASE WHEN {broken} IS NULL THEN json_object({record}) END AS record, {raw} AS raw
    FROM {source}
    """


def _check_columns(path: Path, names: list[str], default_model: str | None) -> None:
    """File-level problems of a CSV header or a Parquet schema: unknown, repeated or missing columns."""
    problems = [
        f"{path}: unknown column {name!r}; remove or rename it (known columns: {', '.join(FEEDBACK_COLUMNS)}; "
        "a CSV file's first line must name its columns)"
        for name in names
        if name not in FEEDBACK_COLUMNS
    ]
    problems += [f"{path}: column {name!r} appears twice; keep one" for name in sorted({n for n in names if names.count(n) > 1})]
    missing = [name for name in _REQUIRED if name not in names and not (name == "model" and default_model)]
    problems += [f"{path}: no column {name!r}; add it ({_FIELD_HINTS[name]})" for name in missing]
    if problems:
        raise _refusal(problems, len(problems))


_CHUNK = 1 << 26  # bytes scanned at a time for CSV quotes: bounds the scan's temporary arrays
_BOM = b"\xef\xbb\xbf"


def _records(data: np.ndarray, *, quoted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Split bytes into records at "\\n" (only outside double quotes when `quoted`, as in CSV).

    Returns the records' bounds (start offsets, then the end of the data), the 1-based line each
    starts on, the offsets of the commas outside quotes (CSV) and whether a quote is left open at the
    end. A record keeps its line break. Only "\\n" ends a line: U+2028, U+0085 and the like are text.
    """
    first = len(_BOM) if data[: len(_BOM)].tobytes() == _BOM else 0
    if quoted:
        found: dict[str, list[np.ndarray]] = {"breaks": [], "record_breaks": [], "commas": []}
        inside = 0
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            # Quote parity before each byte; RFC 4180 doubles a quote inside a quoted value, so parity holds.
            parity = np.bitwise_xor.accumulate((chunk == ord('"')).view(np.uint8)) ^ np.uint8(inside)
            inside = int(parity[-1])
            newline, outside = chunk == ord("\n"), parity == 0
            found["breaks"].append(np.flatnonzero(newline) + start)
            found["record_breaks"].append(np.flatnonzero(newline & outside) + start)
            found["commas"].append(np.flatnonzero((chunk == ord(",")) & outside) + start)
        breaks, record_breaks, commas = (
            np.concatenate(found[key]) if found[key] else np.empty(0, np.int64) for key in ("breaks", "record_breaks", "commas")
        )
        open_quote = bool(inside)
    else:
        breaks = record_breaks = np.flatnonzero(data == ord("\n"))
        commas, open_quote = np.empty(0, np.int64), False
    starts = np.concatenate([[first], record_breaks + 1]).astype(np.int64)
    if starts[-1] == len(data):  # the data ends with "\n": no record after it
        starts = starts[:-1]
    bounds = np.concatenate([starts, [len(data)]]).astype(np.int64)
    return bounds, np.searchsorted(breaks, starts) + 1, commas, open_quote


def _blank(data: np.ndarray, bounds: np.ndarray, blank_bytes: bytes) -> np.ndarray:
    """Per record: True when it holds only `blank_bytes` (a record is never empty: it keeps its break)."""
    if len(bounds) < 2:
        return np.zeros(0, bool)
    visible = np.ones(256, bool)
    visible[list(blank_bytes)] = False
    return ~np.logical_or.reduceat(visible[data], bounds[:-1])


def _binary(data: bytes, bounds: np.ndarray) -> pa.Array:
    """The records as one Arrow array over the file's bytes, without a copy."""
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(bounds) - 1, [None, pa.py_buffer(bounds), pa.py_buffer(data)])


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidFeedbackError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InvalidFeedbackError(f"{path}: is a folder; pass one file") from None


def _stage_jsonl(con: duckdb.DuckDBPyConnection, path: Path) -> _Staged:
    """JSONL: numpy splits the lines (their numbers are exact), DuckDB's JSON functions read them."""
    data = _read_bytes(path)
    array = np.frombuffer(data, np.uint8)
    bounds, lines, _, _ = _records(array, quoted=False)
    blank = _blank(array, bounds, b" \t\r\n")
    con.register("jsonl_lines", pa.table({"line": lines, "raw": _binary(data, bounds), "blank": blank}))
    lines_sql = "SELECT line, rtrim(try(decode(raw)), chr(13) || chr(10)) AS body, raw FROM jsonl_lines WHERE NOT blank"
    return _Staged(_json_staged(lines_sql), _file_place, blank_lines=int(blank.sum()), params={"place": f"{path}:"})


def _stage_csv(con: duckdb.DuckDBPyConnection, path: Path, default_model: str | None, scratch: Path) -> _Staged:
    """CSV through DuckDB's reader. numpy finds the records first, so every row knows its line and a
    row with too many or too few values is named (DuckDB alone stops the whole file at it)."""
    data = _read_bytes(path)
    array = np.frombuffer(data, np.uint8)
    bounds, lines, commas, open_quote = _records(array, quoted=True)
    if len(bounds) < 2:
        raise InvalidFeedbackError(f"{path}: empty file; the first line must be a header naming the columns")
    try:
        header = data[bounds[0] : bounds[1]].decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InvalidFeedbackError(f"{path}:1: not UTF-8 text; save the file as UTF-8") from None
    names = next(csv.reader([header]), [])
    _check_columns(path, names, default_model)
    count = len(lines)
    blank = _blank(array, bounds, b"\r\n")
    con.register(
        "csv_records",
        pa.table(
            {
                "line": lines,
                "raw": _binary(data, bounds),
                "data_row": ~blank & (np.arange(count) > 0),
                "n_values": np.bincount(np.searchsorted(bounds, commas, side="right") - 1, minlength=count) + 1,
                "open_quote": np.arange(count) == count - 1 if open_quote else np.zeros(count, bool),
            }
        ),
    )
    judged = f"""
        SELECT line, raw,
               CASE WHEN open_quote THEN 'a quoted value is not closed (no matching " up to the end of the file); close it'
                    WHEN try(decode(raw)) IS NULL THEN {_NOT_UTF8}
                    WHEN n_values <> {len(names)}
                    THEN 'has ' || n_values || ' values, the header names {len(names)} columns; '
                         || 'give one value per column, in quotes when it holds a comma'
               END AS broken
        FROM csv_records WHERE data_row"""
    bad = con.execute(f"SELECT list(line) FROM ({judged}) WHERE broken IS NOT NULL").fetchall()[0][0] or []
    readable = path
    if bad:
        # DuckDB stops at the first malformed record, so it reads a copy without them; they are reported.
        keep = ~np.isin(lines, np.asarray(bad))
        readable = scratch / "readable.csv"
        readable.write_bytes(array[np.repeat(keep, np.diff(bounds))].tobytes())
    columns = "{" + ", ".join(f"{_lit(name)}: 'VARCHAR'" for name in names) + "}"
    try:
        rows = con.sql(
            f"""SELECT * FROM read_csv($path, header = true, auto_detect = false, columns = {columns},
                delim = ',', quote = '"', escape = '"', strict_mode = true, max_line_size = 2147483647)""",
            params={"path": str(readable)},
        ).to_arrow_table()
    except duckdb.Error as error:
        raise InvalidFeedbackError(
            f"{path}: DuckDB could not read it as CSV ({str(error).splitlines()[0]}); write comma-separated values "
            'under a header line, with values that hold commas, quotes or newlines in "double quotes"'
        ) from None
    # DuckDB returns rows in file order, so the n-th row it read is the n-th record not reported above.
    con.register("csv_rows", rows.append_column("row_index", pa.array(np.arange(rows.num_rows, dtype=np.int64))))
    source = f"""(SELECT *, CASE WHEN broken IS NULL
                            THEN row_number() OVER (PARTITION BY broken IS NULL ORDER BY line) - 1 END AS row_index
                  FROM ({judged})) AS s
                 LEFT JOIN csv_rows AS r USING (row_index)"""
    staged = _typed_staged(
        source,
        {name: f"r.{name}" for name in names if name in _CHECKED_FIELDS},
        line="s.line",
        broken="s.broken",
        raw=f"CASE WHEN s.broken IS NOT NULL THEN {_text_of('s.raw')} END",
    )
    return _Staged(staged, _file_place, blank_lines=int(blank[1:].sum()), params={"place": f"{path}:"})


_TIME_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS")
_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")


def _stage_parquet(con: duckdb.DuckDBPyConnection, path: Path, default_model: str | None) -> _Staged:
    """Parquet through DuckDB's reader; a column's type is checked once, for the whole file."""
    if not path.is_file():
        _read_bytes(path)  # raises the missing-file error
    try:
        described = con.execute(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet($path))", {"path": str(path)}
        ).fetchall()
    except duckdb.Error as error:
        raise InvalidFeedbackError(
            f"{path}: not a Parquet file DuckDB can read ({str(error).splitlines()[0]}); check the file or its suffix"
        ) from None
    types = dict(described)
    _check_columns(path, [name for name, _ in described], default_model)
    allowed = {"created_at": ("VARCHAR", *_TIME_TYPES), "id": ("VARCHAR", *_INTEGER_TYPES)}
    wrong = [
        f"{path}: column {name!r} is {kind}; store "
        + ("timestamps or ISO 8601 text" if name == "created_at" else "text (a string column)")
        for name, kind in types.items()
        if name in _CHECKED_FIELDS and kind not in (*allowed.get(name, ("VARCHAR",)), '"NULL"')
    ]
    if wrong:
        raise _refusal(wrong, len(wrong))
    staged = _typed_staged(
        "read_parquet($path, file_row_number = true)",
        {name: name for name in types if name in _CHECKED_FIELDS},
        line="file_row_number + 1",
    )
    return _Staged(staged, _file_place, params={"path": str(path), "place": f"{path} row "})


def _row_json(row: Any, where: str) -> str:
    """One API row as JSON text, so it meets the same rules as a JSONL line."""
    if isinstance(row, FeedbackInput):
        row = {item.name: getattr(row, item.name) for item in fields(row)}
    if isinstance(row, Mapping):
        row = dict(row)
        if isinstance(row.get("created_at"), date):  # a datetime is a date; naive means UTC
            row["created_at"] = row["created_at"].isoformat()
        for name, value in row.items():
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    problem = (
                        f"{where}: field {name!r}: holds the surrogate code point U+{ord(value[error.start]):04X} at "
                        f"character {error.start}, which is not text and cannot be stored as UTF-8; remove it, or decode "
                        "the source text with errors='replace'"
                    )
                    raise _refusal([problem], 1) from None
    try:
        return json.dumps(row, allow_nan=False)
    except (TypeError, ValueError) as error:
        named = next((k for k, v in row.items() if not _is_json(v)), None) if isinstance(row, dict) else None
        field_name = f"field {named!r}: " if named is not None else ""
        problem = (
            f"{where}: {field_name}cannot be stored ({error}); "
            "give text (str), None for a missing value, and a datetime or ISO 8601 text for created_at"
        )
        raise _refusal([problem], 1) from None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _refusal(shown: list[str], total: int, tip: str = "") -> InvalidFeedbackError:
    """One line for one problem (the CLI prints it as its error line), else a list of the first ones.
    `tip` is a clause: 'to ..., do ...'."""
    if total == 1:
        return InvalidFeedbackError(f"nothing was stored: {shown[0]}" + (f"; {tip}" if tip else ""))
    shown = shown[:MAX_LISTED_ERRORS]
    more = total - len(shown)
    head = "nothing was stored; fix these and retry:"
    body = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
    return InvalidFeedbackError(f"{head}\n  {body}" + (f"\n{tip[:1].upper()}{tip[1:]}." if tip else ""))


@dataclass(frozen=True)
class _Outcome:
    rows: int
    bad_rows: int
    problems: int
    already_stored: int


# -- the store's side ---------------------------------------------------------------------------


class FeedbackIngest(FeedbackDatabase):
    """Storing rated outputs (one row, many rows, or a file) and exporting them."""

    def add(self, row: FeedbackInput | Mapping[str, Any]) -> str:
        """Check and store one row; returns its id (a fresh uuid4 hex when it has none).

        A row whose id is already stored with the same content is not stored again (a retried call
        is harmless); with other content it is refused. InvalidFeedbackError when refused.
        """
        return self._add_rows([row], lambda line: "'feedback'", lambda index: "feedback")[0]

    def add_many(self, rows: Iterable[FeedbackInput | Mapping[str, Any]]) -> list[str]:
        """Check every row, then store all of them in one transaction, or none; returns their ids."""
        rows = list(rows)
        if not rows:
            return []
        return self._add_rows(rows, lambda line: f"('rows[' || {line} || ']')", lambda index: f"rows[{index}]")

    def import_file(
        self, path: Path, *, default_model: str | None = None, source: str = "import", skip_invalid: bool = False
    ) -> ImportReport:
        """Store the rows of a JSONL (.jsonl, .ndjson), CSV (with a header line) or Parquet file.

        A row without `model` gets `default_model`, one without `source` gets `source`, one without
        `id` an id derived from its content, so importing the same file again changes nothing: a
        row whose id is stored with the same content is skipped and counted. Blank lines are skipped.

        A file with a bad row is refused whole (nothing is stored) with the first problems, each
        naming `FILE:LINE` (Parquet: `FILE row N`) and the field. With `skip_invalid`, the good rows
        are stored and each bad one goes to `<name>.rejected.jsonl` beside the file: its line, the
        record as read (or the raw line), and its problems.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in IMPORT_FORMATS:
            raise InvalidFeedbackError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}; supported: {', '.join(IMPORT_FORMATS)} "
                "(JSONL: one JSON object per line; CSV: a header line naming the columns)"
            )
        if default_model is not None and not MODEL_NAME.match(default_model):
            raise InvalidFeedbackError(f"default_model {default_model!r} is not a model name; {_FIELD_HINTS['model']}")
        if not source.strip():
            raise InvalidFeedbackError(f"source {source!r} is empty; {_FIELD_HINTS['source']}")
        rejected_path = path.with_name(f"{path.stem}.rejected.jsonl")
        with tempfile.TemporaryDirectory(prefix="incremental-import-") as scratch, self._write() as con:
            if suffix == ".parquet":
                staged = _stage_parquet(con, path, default_model)
            elif suffix == ".csv":
                staged = _stage_csv(con, path, default_model, Path(scratch))
            else:
                staged = _stage_jsonl(con, path)
            outcome = self._check(con, staged, default_model=default_model, default_source=source, id_default=_CONTENT_ID)
            if outcome.rows == 0:
                raise InvalidFeedbackError(f"{path}: no feedback rows found; the file is empty or only blank lines")
            if outcome.bad_rows and not skip_invalid:
                tip = f"to store the valid rows and write the others to {rejected_path}, import with skip_invalid=True (CLI: --skip-invalid)"
                raise self._refused(con, staged, outcome, tip)
            if outcome.bad_rows:
                reject_sql = f"""
                    COPY (WITH staged AS ({staged.sql})
                          SELECT c.line, s.record, s.raw, c.problems
                          FROM checked AS c JOIN staged AS s USING (line)
                          WHERE len(c.problems) > 0 ORDER BY c.line)
                    TO $rejects (FORMAT json)"""
                con.execute(reject_sql, _params(reject_sql, rejects=str(rejected_path), **staged.params))
            con.execute(_INSERT_SQL, {"now": utcnow()})
        return ImportReport(
            path=path,
            stored=outcome.rows - outcome.bad_rows - outcome.already_stored,
            already_stored=outcome.already_stored,
            blank_lines=staged.blank_lines,
            rejected=outcome.bad_rows,
            rejected_path=rejected_path if outcome.bad_rows else None,
        )

    def export(self, path: Path, *, model: str | None = None, overwrite: bool = False) -> int:
        """Write every feedback row (of `model`, or all) with all its columns to a .jsonl or .parquet
        file, ordered by (created_at, id); returns how many. `import_file` reads the file back."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in EXPORT_FORMATS:
            raise InvalidFeedbackError(
                f"{path}: cannot export to {path.suffix or '(no suffix)'!r}; use one of: {', '.join(EXPORT_FORMATS)}"
            )
        if path.exists() and not overwrite:
            raise ExportTargetExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another name")
        if model is not None:
            check_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and moved into place, so a failed export leaves no half file.
        partial = path.with_name(f".{path.name}.partial")
        sql = f"""
            COPY (SELECT {", ".join(FEEDBACK_COLUMNS)} FROM feedback
                  WHERE $model::VARCHAR IS NULL OR model = $model::VARCHAR ORDER BY created_at, id)
            TO $path (FORMAT {"parquet" if suffix == ".parquet" else "json"})"""
        try:
            with self._read() as con:
                written = con.execute(sql, {"model": model, "path": str(partial)}).fetchall()[0][0]
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return int(written)

    # -- shared by every way in -------------------------------------------------------------------

    def _add_rows(self, rows: list[Any], place: Callable[[str], str], where: Callable[[int], str]) -> list[str]:
        texts = [_row_json(row, where(index)) for index, row in enumerate(rows)]
        table = pa.table({"line": np.arange(len(texts), dtype=np.int64), "body": pa.array(texts, pa.string())})
        staged = _Staged(_json_staged("SELECT line, body, NULL::BLOB AS raw FROM api_rows"), place)
        with self._write() as con:
            con.register("api_rows", table)
            outcome = self._check(con, staged, default_model=None, default_source="api", id_default=_RANDOM_ID)
            if outcome.bad_rows:
                raise self._refused(con, staged, outcome)
            con.execute(_INSERT_SQL, {"now": utcnow()})
            return [row_id for (row_id,) in con.execute("SELECT id FROM checked ORDER BY line").fetchall()]

    def _check(
        self, con: duckdb.DuckDBPyConnection, staged: _Staged, *, default_model: str | None, default_source: str, id_default: str
    ) -> _Outcome:
        """Run the rule set over the staged rows into the temp table `checked`; count what it found."""
        sql = _checked_sql(staged.sql, staged.place, id_default)
        values = {
            "eval_cut": round(self.stored_share(con) * 10_000),
            "now": utcnow(),
            "default_model": default_model,
            "default_source": default_source,
            **staged.params,
        }
        con.execute(sql, _params(sql, **values))
        rows, bad_rows, problems, same = con.execute(
            """SELECT count(*), count(*) FILTER (WHERE len(problems) > 0), coalesce(sum(len(problems)), 0),
                      count(*) FILTER (WHERE len(problems) = 0 AND stored_same)
               FROM checked"""
        ).fetchall()[0]
        return _Outcome(rows=rows, bad_rows=bad_rows, problems=int(problems), already_stored=same)

    @staticmethod
    def _refused(con: duckdb.DuckDBPyConnection, staged: _Staged, outcome: _Outcome, tip: str = "") -> InvalidFeedbackError:
        """The first problems in row order, each with where it is; the caller's transaction rolls back."""
        sql = f"""SELECT {staged.place("line")}, problems FROM checked
                  WHERE len(problems) > 0 ORDER BY line LIMIT {MAX_LISTED_ERRORS}"""
        first = con.execute(sql, _params(sql, **staged.params)).fetchall()
        shown = [f"{where}: {problem}" for where, problems in first for problem in problems]
        return _refusal(shown, outcome.problems, tip)
