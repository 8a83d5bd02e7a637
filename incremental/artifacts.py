"""Checks that a generated artifact (Mermaid ERD, OpenAPI 3 YAML, HTML prototype) is well-formed, and reads
back the entity and field names it declares, so a quality gate can compare a generation with its reference.

It checks structure only, never meaning: it does not know which names a meeting asked for, whether types
make sense, nor the full Mermaid, OpenAPI or HTML grammars beyond what the synthetic artifacts use.
"""

from __future__ import annotations

import re
from collections.abc import Set
from dataclasses import dataclass
from html.parser import HTMLParser

import yaml

from incremental.prompting import ARTIFACT_TYPES

__all__ = ["ArtifactCheck", "check_artifact", "content_f1"]


@dataclass(frozen=True)
class ArtifactCheck:
    """Whether a text is a well-formed artifact of its type, and the names it declares."""

    valid: bool  # parses as its declared artifact type
    problem: str | None  # why not, in words a user understands; None when valid
    names: frozenset[str]  # lower-case entity names ("book") and fields ("book.title")


def check_artifact(artifact_type: str, text: str) -> ArtifactCheck:
    """Check `text` as an artifact of `artifact_type` ('erd', 'api' or 'prototype').

    Never raises on the text: anything that is not a well-formed artifact gives valid=False and a
    problem. An unknown `artifact_type` is a caller's mistake and raises ValueError.
    """
    checker = _CHECKERS.get(artifact_type) if isinstance(artifact_type, str) else None
    if checker is None:
        raise ValueError(f"artifact_type={artifact_type!r}: expected one of {', '.join(ARTIFACT_TYPES)}")
    if not isinstance(text, str):
        return _invalid(f"expected text, got {type(text).__name__}")
    if not text.strip():
        return _invalid("empty text")
    return checker(text)


def content_f1(predicted: Set[str], reference: Set[str]) -> float:
    """F1 of two name sets: 1.0 when both are empty, 0.0 when only one is."""
    if not predicted and not reference:
        return 1.0
    return 2 * len(predicted & reference) / (len(predicted) + len(reference))


def _invalid(problem: str) -> ArtifactCheck:
    return ArtifactCheck(False, problem, frozenset())


def _valid(names: set[str]) -> ArtifactCheck:
    return ArtifactCheck(True, None, frozenset(names))


def _quote(line: str, limit: int = 40) -> str:
    """A line as shown in a problem: repr'd so control characters stay visible, and cut short."""
    return repr(line if len(line) <= limit else line[:limit] + "...")


# --- ERD (Mermaid erDiagram) -------------------------------------------------------------------------

_NAME = r"[A-Za-z_][\w-]*"
# Mermaid cardinalities, left then right of the line: zero-or-one, exactly one, zero-or-more, one-or-more.
_LEFT = r"(?:\|o|\|\||\}o|\}\|)"
_RIGHT = r"(?:o\||\|\||o\{|\|\{)"
_UNLABELLED = rf"({_NAME})\s*{_LEFT}(?:--|\.\.){_RIGHT}\s*({_NAME})"
_RELATION = re.compile(rf'{_UNLABELLED}\s*:\s*(?:[\w-]+|"[^"\n]*")')
_BLOCK_OPEN = re.compile(rf"({_NAME})\s*\{{")
# "type name [PK|FK|UK[, ...]] ["comment"]"; types may hold (), [] and -, names may start with '*'.
_ATTRIBUTE = re.compile(
    r"[A-Za-z_][\w\-\[\]()]*\s+(\*?[A-Za-z_][\w\-\[\]()]*)"
    r'(?:\s+(?:PK|FK|UK)(?:\s*,\s*(?:PK|FK|UK))*)?(?:\s+"[^"\n]*")?'
)


def _check_erd(text: str) -> ArtifactCheck:
    lines = text.split("\n")
    header = next(i for i, line in enumerate(lines) if line.strip())  # text is not blank
    if lines[header].strip() != "erDiagram":
        got = _quote(lines[header].strip())
        return _invalid(f"line {header + 1}: expected 'erDiagram' as the first line, got {got}")
    names: set[str] = set()
    declared = 0  # entity blocks and relations
    block: tuple[str, int] | None = None  # (entity, line number) of the open block
    for number, raw in enumerate(lines[header + 1 :], start=header + 2):
        line = raw.strip()
        if not line or line.startswith("%%"):  # blank line or Mermaid comment
            continue
        if block is not None:
            entity, opened = block
            if line == "}":
                block = None
            elif (attribute := _ATTRIBUTE.fullmatch(line)) is not None:
                names.add(f"{entity.lower()}.{attribute.group(1).lstrip('*').lower()}")
            elif _BLOCK_OPEN.fullmatch(line) or _RELATION.fullmatch(line):
                return _invalid(
                    f"line {number}: {_quote(line)} inside the block of '{entity}' (line {opened}), which is not closed with '}}'"
                )
            else:
                return _invalid(f"line {number}: expected 'type name' or '}}' inside the block of '{entity}', got {_quote(line)}")
        elif (relation := _RELATION.fullmatch(line)) is not None:
            names.update(relation.group(i).lower() for i in (1, 2))
            declared += 1
        elif (opening := _BLOCK_OPEN.fullmatch(line)) is not None:
            block = (opening.group(1), number)
            names.add(opening.group(1).lower())
            declared += 1
        elif line == "}":
            return _invalid(f"line {number}: '}}' closes no open block")
        elif _ATTRIBUTE.fullmatch(line):
            return _invalid(f"line {number}: attribute {_quote(line)} outside an entity block")
        elif re.fullmatch(rf"{_UNLABELLED}\s*:?\s*", line):
            return _invalid(f"line {number}: relation {_quote(line)} has no label, as in 'A ||--o{{ B : has'")
        else:
            return _invalid(f"line {number}: expected 'Entity {{', a relation or '}}', got {_quote(line)}")
    if block is not None:
        return _invalid(f"line {block[1]}: the block of '{block[0]}' is never closed with '}}'")
    if not declared:
        return _invalid("no entity or relation after 'erDiagram'")
    return _valid(names)


# --- API (OpenAPI 3 YAML) ----------------------------------------------------------------------------

_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# Path-item fields that are not operations ($ref and servers are OpenAPI's too; x- extensions are allowed).
_PATH_ITEM_FIELDS = frozenset({"parameters", "summary", "description", "$ref", "servers"})


def _kind(value: object) -> str:
    """What a YAML value is, in words: "nothing", "a list", "an empty mapping", ..."""
    if value is None:
        return "nothing"
    if value == {}:
        return "an empty mapping"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _check_api(text: str) -> ArtifactCheck:
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        return _invalid(f"{where}YAML syntax error: {exc.problem or exc.context or 'unreadable YAML'}")
    except yaml.YAMLError as exc:  # e.g. ReaderError: a character YAML does not allow
        return _invalid(f"not readable as YAML: {' '.join(str(exc).split())}")
    except RecursionError:
        return _invalid("not readable as YAML: nested too deeply")
    except Exception as exc:  # noqa: BLE001 - constructors raise plain errors too, e.g. ValueError on a date like 2024-13-45
        return _invalid(f"not readable as YAML: {type(exc).__name__}: {exc}")
    if not isinstance(document, dict):
        return _invalid(f"expected a YAML mapping with openapi, info and paths, got {_kind(document)}")

    version = document.get("openapi")
    if version is None:
        hint = " (this looks like Swagger 2.0; only OpenAPI 3.x is supported)" if "swagger" in document else ""
        return _invalid(f"missing 'openapi', the OpenAPI version such as 3.0.0{hint}")
    if not isinstance(version, str) or not version.startswith("3."):
        return _invalid(f"openapi is {version!r}: expected a 3.x version written as a string, such as 3.0.0")

    info = document.get("info")
    if not isinstance(info, dict):
        return _invalid(f"'info' must be a mapping with title and version, got {_kind(info)}")
    for field in ("title", "version"):
        if info.get(field) is None:
            return _invalid(f"'info' has no {field}")

    paths = document.get("paths")
    if not isinstance(paths, dict) or not paths:
        return _invalid(f"'paths' must be a non-empty mapping of paths such as /books, got {_kind(paths)}")
    for path, item in paths.items():
        if not isinstance(path, str) or not path.startswith("/"):
            return _invalid(f"path {path!r} must start with '/'")
        if not isinstance(item, dict):
            return _invalid(f"path {path}: expected a mapping of operations (get, post, ...), got {_kind(item)}")
        operations = 0
        for key, operation in item.items():
            if key in _HTTP_METHODS:
                # OpenAPI requires `responses` in every operation, but the synthetic specs (and so the
                # references a generation is compared with) leave it out: it is not required here.
                if not isinstance(operation, dict):
                    return _invalid(f"path {path}, {key}: expected a mapping (summary, responses, ...), got {_kind(operation)}")
                operations += 1
            elif not (key in _PATH_ITEM_FIELDS or (isinstance(key, str) and key.startswith("x-"))):
                return _invalid(f"path {path}: {key!r} is not an HTTP method ({', '.join(sorted(_HTTP_METHODS))})")
        if not operations:
            return _invalid(f"path {path} has no operation (get, post, ...)")

    names: set[str] = set()
    components = document.get("components")
    if components is None:
        return _valid(names)
    if not isinstance(components, dict):
        return _invalid(f"'components' must be a mapping, got {_kind(components)}")
    schemas = components.get("schemas")
    if schemas is None:
        return _valid(names)
    if not isinstance(schemas, dict):
        return _invalid(f"'components.schemas' must be a mapping of schema names, got {_kind(schemas)}")
    for schema_name, schema in schemas.items():
        if not isinstance(schema, dict):
            return _invalid(f"schema {schema_name!r}: expected a mapping (properties, ...), got {_kind(schema)}")
        schema_key = str(schema_name).lower()
        names.add(schema_key)
        properties = schema.get("properties")
        if properties is None:
            continue
        if not isinstance(properties, dict):
            return _invalid(f"schema {schema_name!r}: 'properties' must be a mapping, got {_kind(properties)}")
        names.update(f"{schema_key}.{str(prop).lower()}" for prop in properties)
    return _valid(names)


# --- Prototype (HTML forms) --------------------------------------------------------------------------

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})
_FIELDS = frozenset({"input", "select", "textarea"})
_RAW_TEXT = frozenset({"script", "style"})  # their content may hold '<' legitimately
_TAG_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")


def _tag(name: str, end: bool = False) -> str:
    """A start (or end) tag as shown in a problem; junk names are repr'd and cut short."""
    return f"<{'/' if end else ''}{name if _TAG_NAME.fullmatch(name) else _quote(name, 20)}>"


class _HtmlChecker(HTMLParser):
    """Tracks open tags and the form they sit in; keeps the first problem met."""

    def __init__(self) -> None:
        # Character references come apart from the text, so a '<' in the text is a raw one.
        super().__init__(convert_charrefs=False)
        self.problem: str | None = None
        self.open: list[tuple[str, int]] = []  # (tag, line)
        self.form: str | None = None  # lower-case id of the open form ("" when it has none)
        self.forms = 0
        self.names: set[str] = set()

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = f"line {self.getpos()[0]}: {problem}"

    def _start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: (value or "").strip().lower() for key, value in attrs}
        if tag == "form":
            if self.form is not None:
                self._fail("a <form> inside another <form>")
            self.form = values.get("id", "")
            self.forms += 1
            if self.form:
                self.names.add(self.form)
        elif tag in _FIELDS and self.form and values.get("name"):
            self.names.add(f"{self.form}.{values['name']}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)
        if tag not in _VOID:
            self.open.append((tag, self.getpos()[0]))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)  # <x/>: opened and closed at once
        if tag == "form":
            self.form = None

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            self._fail(f"{_tag(tag, end=True)}: {_tag(tag)} is a void element and has no end tag")
        elif not self.open:
            self._fail(f"stray {_tag(tag, end=True)}: no tag is open")
        elif self.open[-1][0] != tag:
            inner, line = self.open[-1]
            if any(open_tag == tag for open_tag, _ in self.open):
                self._fail(f"{_tag(tag, end=True)} while {_tag(inner)} (line {line}) is still open")
            else:
                self._fail(f"stray {_tag(tag, end=True)}: it closes no open tag")
        else:
            self.open.pop()
            if tag == "form":
                self.form = None

    def handle_data(self, data: str) -> None:
        # HTMLParser hands a '<' that starts no tag over as text.
        if "<" in data and not (self.open and self.open[-1][0] in _RAW_TEXT):
            self._fail("a '<' that starts no tag (write &lt; for a literal <)")


def _check_prototype(text: str) -> ArtifactCheck:
    checker = _HtmlChecker()
    try:
        checker.feed(text)
        # What the parser still holds back after feed() is an unfinished construct; close() would pass it
        # on as text or drop it, depending on the Python version, so it is judged here.
        leftover = checker.rawdata.lstrip()
        if checker.problem is None and leftover.startswith("<"):
            return _invalid(f"unfinished tag at the end: {_quote(leftover)}")
        checker.close()
    except Exception as exc:  # noqa: BLE001 - HTMLParser has raised on odd input in some Python versions
        return _invalid(f"not readable as HTML: {type(exc).__name__}: {exc}")
    if checker.problem is not None:
        return _invalid(checker.problem)
    if checker.open:
        tag, line = checker.open[-1]
        return _invalid(f"line {line}: {_tag(tag)} is never closed")
    if not checker.forms:
        return _invalid("no <form>: a prototype needs at least one form")
    return _valid(checker.names)


_CHECKERS = {"erd": _check_erd, "api": _check_api, "prototype": _check_prototype}
