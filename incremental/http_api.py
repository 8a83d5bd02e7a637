"""A small HTTP endpoint over a `serving.Generator`, so an app can generate and rate without Python.

    POST /generate  {"artifact_type", "notes", "max_new_tokens"?}           -> {"id", "model", "version", "artifact_type", "output", "decoding"}
    POST /rate      {"generation_id", "rating", "correction"?, "rater"?}  -> {"feedback_id", "generation_id"}
    GET  /health                                                         -> {"model", "version", "mode", "follow", "last_error"}

JSON in and out, standard library only (`http.server`, one thread per connection). A request the
endpoint cannot take is a 400 whose `error` names the field and the fix; an unknown generation is
a 404, a second rating of one a 409, a feedback database locked past its timeout a 503. It knows
nothing about models: the Generator serializes generation requests and follows promotions. A
rating's `rater` names who rated (the app's user); without it the row's rater is not known.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from incremental.errors import IncrementalError
from incremental.feedback import (
    AlreadyRatedError,
    FeedbackStoreLockedError,
    UnknownGenerationError,
)
from incremental.feedback.ingest import MAX_FIELD_BYTES

if TYPE_CHECKING:
    from incremental.serving import Generator

__all__ = ["HTTP_SOURCE", "MAX_BODY_BYTES", "ServingHTTPServer", "make_server"]

log = logging.getLogger("incremental")

HTTP_SOURCE = "http"  # the feedback rows' `source` for ratings that came through this endpoint
# The largest request: a rating's correction or a generation's notes (MAX_FIELD_BYTES each), JSON-escaped.
MAX_BODY_BYTES = 2 * MAX_FIELD_BYTES + 64 * 1024

# Each route's fields: name -> (JSON types accepted, required).
_GENERATE_FIELDS = {"artifact_type": ((str,), True), "notes": ((str,), True), "max_new_tokens": ((int,), False)}
_RATE_FIELDS = {
    "generation_id": ((str,), True),
    "rating": ((str,), True),
    "correction": ((str, type(None)), False),
    "rater": ((str, type(None)), False),
}
_JSON_TYPE_NAMES = {str: "a string", int: "a whole number", type(None): "null"}


class RequestError(Exception):
    """A request this endpoint refuses: the HTTP status and the message for the `error` field."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServingHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that answers with `generator`."""

    daemon_threads = True  # a client that keeps its connection open does not stop the server from exiting

    def __init__(self, address: tuple[str, int], generator: Generator) -> None:
        self.generator = generator
        super().__init__(address, _Handler)


def make_server(generator: Generator, host: str = "127.0.0.1", port: int = 8000) -> ServingHTTPServer:
    """A server bound to host:port (0: any free port; `server.server_address` says which); call `serve_forever()`."""
    return ServingHTTPServer((host, port), generator)


class _Handler(BaseHTTPRequestHandler):
    server: ServingHTTPServer
    server_version = "incremental"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self) -> dict[str, Any]:
        if self.path != "/health":
            raise RequestError(HTTPStatus.NOT_FOUND, f"GET {self.path}: not found; GET /health, POST /generate or POST /rate")
        status = self.server.generator.status()
        return {
            "model": status.model, "version": status.version, "mode": status.mode, "follow": status.follow,
            "last_error": status.last_error,
        }  # fmt: skip

    def _post(self) -> dict[str, Any]:
        if self.path == "/generate":
            body = _fields(self._json_body(), _GENERATE_FIELDS)
            generation = self.server.generator.generate(
                body["artifact_type"],
                body["notes"],
                **({"max_new_tokens": body["max_new_tokens"]} if "max_new_tokens" in body else {}),
            )
            return {
                "id": generation.id, "model": generation.model, "version": generation.version,
                "artifact_type": generation.artifact_type, "output": generation.output, "decoding": generation.decoding,
            }  # fmt: skip
        if self.path == "/rate":
            body = _fields(self._json_body(), _RATE_FIELDS)
            generator = self.server.generator
            # No default rater: the server's own user is not who rated; the app names its user.
            feedback_id = generator.rate(
                body["generation_id"], body["rating"], correction=body.get("correction"), source=HTTP_SOURCE,
                rater=body.get("rater"),
            )
            return {"feedback_id": feedback_id, "generation_id": body["generation_id"]}
        raise RequestError(HTTPStatus.NOT_FOUND, f"POST {self.path}: not found; POST /generate or POST /rate")

    def _json_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length: missing; send the JSON body with its length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body: {length} bytes, over the limit of {MAX_BODY_BYTES} bytes; shorten the notes or the correction",
            )
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body: not UTF-8 JSON ({error}); send one JSON object") from None

    def _answer(self, route) -> None:
        try:
            status, document = HTTPStatus.OK, route()
        except RequestError as error:
            status, document = error.status, {"error": str(error)}
        except UnknownGenerationError as error:
            status, document = HTTPStatus.NOT_FOUND, {"error": str(error)}
        except AlreadyRatedError as error:
            status, document = HTTPStatus.CONFLICT, {"error": str(error)}
        except FeedbackStoreLockedError as error:
            status, document = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error)}
        except (IncrementalError, ValueError) as error:  # the Generator's and the store's checks name the field
            status, document = HTTPStatus.BAD_REQUEST, {"error": str(error)}
        # Broad on purpose: one failed request must not end the server; the traceback goes to the log.
        except Exception:
            log.exception("[INCREMENTAL] %s %s failed", self.command, self.path)
            status, document = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; the server log has the traceback"}
        payload = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("[INCREMENTAL] http %s %s", self.address_string(), format % args)


def _fields(body: Any, spec: dict[str, tuple[tuple[type, ...], bool]]) -> dict[str, Any]:
    """`body`'s fields after checking it is an object with the required fields, of their types, and no others."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body: must be a JSON object with the fields {', '.join(spec)}")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{unknown[0]}: unknown field; the fields are {', '.join(spec)}")
    for name, (types, required) in spec.items():
        if name not in body:
            if required:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: missing; the fields are {', '.join(spec)}")
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(_JSON_TYPE_NAMES[kind] for kind in types)
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: must be {expected}, got {json.dumps(value)[:60]}")
    return body
