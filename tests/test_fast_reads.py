"""The API's most polled reads answered before Flask (ttci/scheduler/web/fast_reads.py), on a
real scheduler (SQLite and a throw-away PostgreSQL) with real ENVs placed on a loopback hostd
stand-in: every ordinary read is answered without reaching Flask, with exactly the bytes,
status and type Flask's views give; every other read (no token, a wrong one, a bad page, an
ENV that is not the user's, a stream, HEAD) reaches Flask and gets its usual answer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import Client

from tests.standin_hostd import instant_hostd
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app
from ttci.scheduler.web.fast_reads import FastReads, parse_page
from ttci.wire.api import API_VERSION

ADMIN = "admin-token-fast-reads-0123456789"
JOIN = "join-token-fast-reads-0123456789"
CAPACITY = {"cpus": 8, "memory_mib": 16384, "disk_gib": 100}
HOST_INFO = {
    "api": API_VERSION,
    "total": CAPACITY,
    "free": CAPACITY,
    "images": [{"name": "qemu:debian-12:amd64", "disk_gib": 4}],
}


@pytest.fixture
def hostd() -> Iterator[str]:
    with instant_hostd(HOST_INFO) as url:
        yield url


class _Counting:
    """The Flask app behind the fast path, counting what reaches it."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        result: Iterable[bytes] = self.app(environ, start_response)
        return result


@pytest.fixture
def cloud(tmp_path: Path, database: str, hostd: str) -> Iterator[tuple[Flask, dict[str, str]]]:
    s = Scheduler(tmp_path, {}, admin_token=ADMIN, join_token=JOIN, database=database)
    try:
        app = create_app(s)
        c = app.test_client()
        reg = {"api": API_VERSION, "id": "h1", "url": hostd, "token": "h" * 24, "info": HOST_INFO}
        r = c.post("/v1/hosts/register", json=reg, headers=_auth(JOIN))
        assert r.status_code == 200, r.text
        tokens = {"admin": ADMIN}
        for name in ("alice", "bob"):
            r = c.post("/v1/users", json={"name": name}, headers=_auth(ADMIN))
            assert r.status_code == 201, r.text
            tokens[name] = r.json["token"]
        for owner, env, n in (("alice", "a-1", 3), ("alice", "a-2", 1), ("bob", "b-1", 2)):
            body = {"name": env, "os_prefix": "debian-12:amd64", "memory_mib": 256, "dup_each": n}
            r = c.post("/v1/envs", json=body, headers=_auth(tokens[owner]))
            assert r.status_code in (200, 201), r.text
        yield app, tokens
    finally:
        s.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ORDINARY = [
    "/v1/status",
    "/v1/hosts",
    "/v1/envs",
    "/v1/envs?limit=1",
    "/v1/envs?offset=1&limit=1",
    "/v1/envs?limit=99999",
    "/v1/envs/{env}/vms",
    "/v1/envs/{env}/vms?limit=2",
    "/v1/envs/{env}/vms?offset=1",
    "/v1/envs/{env}/vms?offset=0&limit=1",
]
OTHERS = [
    ("alice", "GET", "/v1/envs/b-1/vms"),  # not hers: 404
    ("alice", "GET", "/v1/envs/nope/vms"),
    ("alice", "GET", "/v1/envs?limit=0"),
    ("alice", "GET", "/v1/envs?limit=abc"),
    ("alice", "GET", "/v1/envs?limit=1&limit=2"),
    ("alice", "GET", "/v1/envs?offset=99999999999"),
    ("alice", "GET", "/v1/envs?stream=1"),
    ("alice", "GET", "/v1/envs/a-1/vms?stream=1"),
    ("alice", "GET", "/v1/status?x=1"),
    ("alice", "GET", "/v1/envs/a-1"),
    ("alice", "HEAD", "/v1/status"),
    ("", "GET", "/v1/status"),
    ("wrong", "GET", "/v1/hosts"),
    ("wrong", "GET", "/v1/envs/a-1/vms"),
]


def _both(app: Flask, counting: _Counting, token: str, method: str, path: str) -> Any:
    headers = _auth(token) if token else {}
    fast = Client(app.wsgi_app).open(path, method=method, headers=headers)
    flask_only = Client(counting.app).open(path, method=method, headers=headers)
    for r in (fast, flask_only):
        r.close()
    return fast, flask_only


@pytest.mark.parametrize("user", ["admin", "alice", "bob"])
def test_ordinary_reads_skip_flask_and_answer_what_flask_answers(
    cloud: tuple[Flask, dict[str, str]], user: str
) -> None:
    app, tokens = cloud
    fast = app.wsgi_app
    assert isinstance(fast, FastReads)
    counting = fast.next = _Counting(fast.next)
    env = "b-1" if user == "bob" else "a-1"  # one of the user's own
    for path in (p.format(env=env) for p in ORDINARY):
        before = counting.calls
        got, want = _both(app, counting, tokens[user], "GET", path)
        assert counting.calls == before, f"{path} reached Flask"
        assert (
            (got.status_code, got.mimetype)
            == (want.status_code, want.mimetype)
            == (
                200,
                "application/json",
            )
        ), path
        assert got.data == want.data, path
        assert got.headers["Content-Length"] == str(len(want.data))
    listing = Client(app.wsgi_app).get("/v1/envs", headers=_auth(tokens[user])).json
    assert (
        sorted(e["name"] for e in listing)
        == {
            "admin": ["a-1", "a-2", "b-1"],
            "alice": ["a-1", "a-2"],
            "bob": ["b-1"],
        }[user]
    )


def test_every_other_read_reaches_flask_and_gets_its_answer(
    cloud: tuple[Flask, dict[str, str]],
) -> None:
    app, tokens = cloud
    fast = app.wsgi_app
    assert isinstance(fast, FastReads)
    counting = fast.next = _Counting(fast.next)
    for who, method, path in OTHERS:
        token = tokens.get(who, who)
        before = counting.calls
        got, want = _both(app, counting, token, method, path)
        assert counting.calls == before + 1, f"{method} {path} did not reach Flask"
        assert (got.status_code, got.data) == (want.status_code, want.data), path
    statuses = {
        path: Client(app.wsgi_app).get(path, headers=_auth(tokens["alice"])).status_code
        for path in ("/v1/envs/b-1/vms", "/v1/envs?limit=0", "/v1/envs?offset=99999999999")
    }
    assert statuses == {
        "/v1/envs/b-1/vms": 404,
        "/v1/envs?limit=0": 400,
        "/v1/envs?offset=99999999999": 400,
    }
    assert Client(app.wsgi_app).get("/v1/status").status_code == 401


@pytest.mark.parametrize(
    ("query", "page"),
    [
        ("", (0, 1000)),
        ("limit=5", (0, 5)),
        ("offset=7&limit=5", (7, 5)),
        ("limit=5&offset=7", (7, 5)),
        ("limit=20000", (0, 10_000)),
        ("offset=2147483648", (2147483648, 1000)),
        ("offset=2147483649", None),
        ("limit=0", None),
        ("limit=-1", None),
        ("limit=+1", None),
        ("limit= 1", None),
        ("limit=\u0661", None),  # an Arabic-Indic 1: isdigit() says yes, the API says no
        ("limit=1&limit=1", None),
        ("limit", None),
        ("limit=1&", None),
        ("stream=1", None),
        ("limit=12345678901", None),
    ],
)
def test_parse_page_takes_only_plain_pages(query: str, page: tuple[int, int] | None) -> None:
    assert parse_page(query, 1 << 31) == page
