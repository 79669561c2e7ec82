"""Shared pieces of our Flask services: bearer-token auth, errors as JSON, strict request bodies,
NDJSON streams.

Error answers are ttci.wire.api.ErrorBody; clients decode them with ttci.wire.api.api_error.

Request bodies are read the strict way (`json_body`, `read_body`): the size is checked from
Content-Length before a byte is read (and counted while reading a body without one), JSON is
refused when it nests deeper than MAX_JSON_DEPTH (checked before the parser recurses), holds
NaN or Infinity, a number that overflows a float (1e400) or runs past MAX_NUMBER_CHARS
characters, or a lone surrogate. Every refusal is a 400 (413 for size), never a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ttci.model.errors import BadInput, TTError
from ttci.wire.api import ApiVersionError, ErrorBody

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "BodyTooLarge",
    "bearer_of",
    "bearer_ok",
    "bearer_token",
    "body_chunks",
    "error_response",
    "install_auth",
    "install_errors",
    "json_body",
    "json_too_deep",
    "ndjson",
    "query_bool",
    "query_int",
    "read_body",
    "strict_loads",
]

log = logging.getLogger("ttci.infra.http_server")
MAX_JSON_BYTES = 8 << 20  # a JSON request (an exec request's stdin rides in it, base64)
MAX_JSON_DEPTH = 32  # our documents nest 4 deep at most (a heartbeat's images)
MAX_NUMBER_CHARS = 40  # one JSON number: digits, sign, point and exponent
_CHUNK = 1 << 16


class BodyTooLarge(BadInput):
    """A request body over its route's limit (answered 413)."""


def error_response(status: int, message: str, hint: str | None = None, kind: str = "") -> Response:
    resp = jsonify(ErrorBody(message, hint, kind).to_dict())
    resp.status_code = status
    return resp


def bearer_token() -> str:
    """The token of this request's `Authorization: Bearer TOKEN` header ("" without one)."""
    return bearer_of(request.headers.get("Authorization", ""))


def bearer_of(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header's value ("" for an empty one)."""
    return header.removeprefix("Bearer ").strip()


def bearer_ok(want: str) -> bool:
    """Whether this request carries the bearer token want (compared in constant time; an
    empty want matches nothing)."""
    given = bearer_token()
    return bool(want) and bool(given) and hmac.compare_digest(given.encode(), want.encode())


def install_auth(
    app: Flask,
    tokens: dict[str, str] | Callable[[str], object | None],
    open_routes: Collection[tuple[str, str]] = (),
) -> None:
    """Require `Authorization: Bearer TOKEN`. tokens maps token -> user, or is a function that
    returns the token's user (None: refused); the user lands in request.environ["tt.user"].

    open_routes: (METHOD, URL rule) pairs that need no token, e.g. ("GET", "/v1/health"); a
    route is open for exactly the methods named (HEAD counts as GET), so another method on an
    open path, or a path no rule matches, still needs a token before any view is reached.
    """
    open_set = {(m.upper(), rule) for m, rule in open_routes}
    app.config["OPEN_ROUTES"] = frozenset(open_set)  # what the OpenAPI tests compare

    def lookup() -> object | None:
        if callable(tokens):
            given = bearer_token()
            return tokens(given) if given else None
        return next((user for token, user in tokens.items() if bearer_ok(token)), None)

    @app.before_request
    def _auth() -> Response | None:
        rule = request.url_rule
        method = "GET" if request.method == "HEAD" else request.method
        if rule is not None and (method, rule.rule) in open_set:
            return None
        user = lookup()
        if user is not None:
            request.environ["tt.user"] = user
            return None
        return error_response(
            401, "missing or wrong token", hint="pass the token from `tt config` / --token"
        )


def install_errors(app: Flask, status_of: dict[type[TTError], int]) -> None:
    """Our errors become JSON answers: the status of the nearest class in status_of (another
    API version: 403; a body over its limit: 413; other BadInput: 400; the rest: 500). Any
    other exception is a bug: logged with its traceback, answered 500 without details."""
    status_of = {ApiVersionError: 403, BodyTooLarge: 413, **status_of}

    @app.errorhandler(TTError)
    def _tt_error(e: TTError) -> Response:
        status = 500
        for cls in type(e).__mro__:
            if cls in status_of:
                status = status_of[cls]
                break
        if isinstance(e, BadInput) and status == 500:
            status = 400
        return error_response(status, e.message, e.hint, kind=type(e).__name__)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Response:
        resp = error_response(e.code or 500, e.description or e.name)
        for key, value in e.get_headers():  # a 405 says what is allowed, a redirect where
            if key in ("Allow", "Location"):
                resp.headers.add(key, value)
        return resp

    @app.errorhandler(Exception)
    def _bug(e: Exception) -> Response:
        log.error("%s %s failed", request.method, request.path, exc_info=e)
        return error_response(
            500, "internal error (a bug): the server's log has the details", kind="InternalError"
        )


def read_body(limit: int) -> bytes:
    """The request body, at most limit bytes: BodyTooLarge from Content-Length before any
    byte is read, or once limit is passed while reading a body sent without a length."""
    return b"".join(body_chunks(limit))


def body_chunks(limit: int) -> Iterator[bytes]:
    """read_body's body as chunks while they arrive, for a route that streams it on: the
    Content-Length is checked now, a body sent without one when it passes limit."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(
            f"the request body is {length} bytes, more than this route's {limit}",
            hint="send less",
        )
    stream = request.stream

    def chunks() -> Iterator[bytes]:
        total = 0
        while chunk := stream.read(min(_CHUNK, limit + 1 - total)):
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(
                    f"the request body is over this route's {limit} bytes", hint="send less"
                )
            yield chunk

    return chunks()


def json_body(limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The request's JSON object, read and parsed the strict way (see strict_loads)."""
    if not request.is_json:
        raise BadInput(
            "request body must be a JSON object", hint="send Content-Type: application/json"
        )
    raw = read_body(limit)
    body = strict_loads(raw) if raw.strip() else None
    if not isinstance(body, dict):
        raise BadInput(
            "request body must be a JSON object", hint="send Content-Type: application/json"
        )
    return body


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects deeper than limit (linear, before parsing;
    brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKET)
    depth = 0
    for ch in brackets:
        if ch in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise BadInput(f"{name} is not a number JSON allows", hint="send a finite number")


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadInput(f"a number of {len(text)} digits is too long", hint="numbers here are small")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if len(text) > MAX_NUMBER_CHARS or not math.isfinite(value):
        raise BadInput(f"the number {text[:50]} is out of range", hint="send a finite number")
    return value


def strict_loads(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text -> Python, or BadInput: malformed, too deep, NaN/Infinity, a number that
    overflows or is too long, a string with a lone surrogate."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_too_deep(data, max_depth):
        raise BadInput(
            f"the JSON nests deeper than {max_depth} levels", hint="send a flatter document"
        )
    try:
        value = json.loads(
            data,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
        if _SURROGATE_ESCAPE.search(data):  # \ud800 alone would break every later encode
            json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError
        raise BadInput(f"the body is not valid JSON: {e}", hint="send UTF-8 JSON") from None
    return value


_INT_RE = re.compile(r"-?[0-9]{1,18}")


def query_int(name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within lo..hi (absent: default), or BadInput."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _INT_RE.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise BadInput(
            f"{name}={raw[:40]!r} is not an integer in {lo}..{hi}", hint=f"e.g. ?{name}={default}"
        )
    return int(raw)


_TRUE, _FALSE = ("1", "true"), ("0", "false")


def query_bool(name: str) -> bool:
    """A yes/no query parameter: 1/true or 0/false (absent: false), or BadInput."""
    raw = request.args.get(name)
    if raw is None or raw in _FALSE:
        return False
    if raw in _TRUE:
        return True
    raise BadInput(f"{name}={raw[:40]!r} is not 1, true, 0 or false", hint=f"e.g. ?{name}=1")


def ndjson(events: Iterator[dict[str, Any]]) -> Response:
    """Stream events as newline-delimited JSON, each flushed as it comes."""

    def gen() -> Iterator[bytes]:
        for ev in events:
            yield (json.dumps(ev, separators=(",", ":")) + "\n").encode()

    return Response(
        gen(),
        mimetype="application/x-ndjson",
        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-store"},
    )
