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

from ttci import __version__
from ttci.wire.api import API_VERSION

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

    from ttci.scheduler.service import Scheduler
    from ttci.scheduler.users import User

__all__ = ["FastReads", "parse_page"]

_ENVS = "/v1/envs/"
_VMS = "/vms"
_MAX_DIGITS = 10  # MAX_OFFSET (2**31) has 10


def parse_page(query: str, max_offset: int) -> tuple[int, int] | None:
    """(offset, limit) from a query string of at most `offset=N` and `limit=N` (plain decimal,
    each once), as the API's _page reads them (limit 1.., more than 10,000 reads as 10,000;
    offset 0..max_offset); None for anything else (Flask then answers it, errors included)."""
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
    return offset, min(limit, 10_000)


class FastReads:
    """WSGI middleware in front of the scheduler's Flask app (see the module's docstring)."""

    def __init__(self, app: Flask, scheduler: Scheduler, max_offset: int) -> None:
        self.next: WSGIApplication = app.wsgi_app
        self.s = scheduler
        self.max_offset = max_offset
        self.dumps: Callable[..., str] = app.json.dumps

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO", "").startswith(
            "/v1/"
        ):
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
        user = self._user(environ)
        if user is None:
            return None
        path, query = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
        if path == "/v1/status" and not query:
            counts = self.s.counts(user)
            head = {"version": __version__, "api": API_VERSION, "user": user.name}
            return self._json({**head, "admin": user.admin, **counts})
        if path == "/v1/hosts" and not query:
            return self.s.pool.public_body(user.admin, self.dumps)
        page = parse_page(query, self.max_offset)
        if page is None:
            return None
        if path == "/v1/envs":
            return self._json(self.s.list_envs(user, *page))
        if path.startswith(_ENVS) and path.endswith(_VMS):
            name = path[len(_ENVS) : -len(_VMS)]
            if name and name.isascii() and "/" not in name:  # else Flask decodes it
                return self.s.page_vms_body(name, user, *page, self.dumps)
        return None

    def _user(self, environ: WSGIEnvironment) -> User | None:
        """The user of the request's bearer token, as the API's auth finds it (None: Flask
        answers, a 401 among others)."""
        token = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
        if not token:
            return None
        user: User | None = self.s.users.resolve(token)
        return user
