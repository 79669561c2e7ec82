"""The API's most polled reads answered before Flask: GET /v1/status, /v1/hosts, /v1/envs and
/v1/envs/NAME/vms, when the request is an ordinary one.

Why: under 50 concurrent API clients on 2 cores, about half of a read's CPU time was Flask and
Werkzeug (a request context, routing, the auth hook, a Response object) around a view that
itself costs little (bench/scheduler.py). These four are what dashboards, `tt env list` loops
and CI front-ends poll. The answer here is the view's own: the same scheduler call and the
same JSON encoder (tests/test_fast_reads.py compares the bytes with Flask's).

An ordinary request: GET, a bearer token of a known user, and a query string holding at most
`offset` and `limit` as plain decimal numbers within the API's bounds. Anything else, and any
error while answering (an unknown ENV, a database failover), goes on to the Flask app, which
answers it as it always did (401, 400, 404, 503 with their JSON bodies). Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ttci.infra.http_server import bearer_of

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

    from ttci.scheduler.service import Scheduler
    from ttci.scheduler.users import User

__all__ = ["MAX_LIMIT", "MAX_OFFSET", "FastReads", "parse_page"]

MAX_OFFSET = 1 << 31  # paging: far past any list, and SQLite takes it
MAX_LIMIT = 10_000  # a larger ?limit= reads as this
_ENVS = "/v1/envs/"
_VMS = "/vms"
_MAX_DIGITS = 10  # MAX_OFFSET (2**31) has 10
Read = Callable[["User"], bytes]


def parse_page(query: str, max_offset: int = MAX_OFFSET) -> tuple[int, int] | None:
    """(offset, limit) from a query string of at most `offset=N` and `limit=N` (plain decimal,
    each once), as the API's _page reads them (limit 1.., more than MAX_LIMIT reads as
    MAX_LIMIT; offset 0..max_offset); None for anything else (Flask then answers it, errors
    included)."""
    got: dict[str, int] = {}
    for part in query.split("&") if query else ():
        key, eq, value = part.partition("=")
        if (
            not eq
            or key not in ("offset", "limit")
            or key in got
            or not value.isascii()
            or not value.isdigit()
            or len(value) > _MAX_DIGITS
        ):
            return None
        got[key] = int(value)
    offset, limit = got.get("offset", 0), got.get("limit", 1000)
    if offset > max_offset or not 1 <= limit <= max_offset:
        return None
    return offset, min(limit, MAX_LIMIT)


class FastReads:
    """WSGI middleware in front of the scheduler's Flask app (see the module's docstring)."""

    def __init__(self, app: Flask, scheduler: Scheduler) -> None:
        self.next: WSGIApplication = app.wsgi_app
        self.s = scheduler
        self.dumps: Callable[..., str] = app.json.dumps

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "GET":
            try:
                body = self._answer(environ)
            except Exception:  # Flask answers it again, with the right error
                body = None
            if body is not None:
                start_response(
                    "200 OK",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
        return self.next(environ, start_response)

    def _json(self, obj: Any) -> bytes:
        """What Flask's jsonify sends (compact, a newline at the end)."""
        return (self.dumps(obj, separators=(",", ":")) + "\n").encode()

    def _answer(self, environ: WSGIEnvironment) -> bytes | None:
        """The read's body, or None for Flask; the token is looked up only for our four reads."""
        read = self._route(environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        if read is None:
            return None
        token = bearer_of(environ.get("HTTP_AUTHORIZATION", ""))
        user: User | None = self.s.users.resolve(token) if token else None
        return None if user is None else read(user)

    def _route(self, path: str, query: str) -> Read | None:
        if path == "/v1/status" and not query:
            return lambda user: self._json(self.s.status(user))
        if path == "/v1/hosts" and not query:
            return lambda user: self.s.pool.public_body(user.admin, self.dumps)
        if path != "/v1/envs" and not (path.startswith(_ENVS) and path.endswith(_VMS)):
            return None
        page = parse_page(query)
        if page is None:
            return None
        if path == "/v1/envs":
            return lambda user: self._json(self.s.list_envs(user, *page))
        name = path[len(_ENVS) : -len(_VMS)]
        if not name or not name.isascii() or "/" in name:  # else Flask decodes it
            return None
        return lambda user: self.s.page_vms_body(name, user, *page, self.dumps)
