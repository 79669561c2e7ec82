"""Shared pieces of our Flask services: bearer-token auth, errors as JSON, NDJSON streams.

Error answers are ttci.wire.api.ErrorBody; clients decode them with ttci.wire.api.api_error.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ttci.model.errors import BadInput, TTError
from ttci.wire.api import ApiVersionError, ErrorBody

__all__ = [
    "bearer_ok",
    "bearer_token",
    "error_response",
    "install_auth",
    "install_errors",
    "json_body",
    "ndjson",
]


def error_response(status: int, message: str, hint: str | None = None, kind: str = "") -> Response:
    resp = jsonify(ErrorBody(message, hint, kind).to_dict())
    resp.status_code = status
    return resp


def bearer_token() -> str:
    """The token of this request's `Authorization: Bearer TOKEN` header ("" without one)."""
    return request.headers.get("Authorization", "").removeprefix("Bearer ").strip()


def bearer_ok(want: str) -> bool:
    """Whether this request carries the bearer token want (compared in constant time; an
    empty want matches nothing)."""
    given = bearer_token()
    return bool(want) and bool(given) and hmac.compare_digest(given.encode(), want.encode())


def install_auth(
    app: Flask,
    tokens: dict[str, str] | Callable[[str], object | None],
    open_paths: tuple[str, ...] = (),
) -> None:
    """Require `Authorization: Bearer TOKEN`. tokens maps token -> user, or is a function that
    returns the token's user (None: refused); the user lands in request.environ["tt.user"]."""

    def lookup() -> object | None:
        if callable(tokens):
            given = bearer_token()
            return tokens(given) if given else None
        return next((user for token, user in tokens.items() if bearer_ok(token)), None)

    @app.before_request
    def _auth() -> Response | None:
        if request.path in open_paths:
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
    API version: 403; other BadInput: 400; the rest: 500)."""
    status_of = {ApiVersionError: 403, **status_of}

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
        return error_response(e.code or 500, e.description or e.name)


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadInput(
            "request body must be a JSON object", hint="send Content-Type: application/json"
        )
    return body


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
