"""Hostile inputs against every API, for real: a tt-scheduler process (an admin, two users, a
registered stand-in host), a tt-hostd process and the GitHub webhook service under waitress.

The classic probes (NaN, Infinity, 1e400, 4,000-digit integers, "false" for booleans, names with
a trailing newline, 10,000-deep nesting, non-integer paging, a 300 MB body to an ENV that is not
yours, wrong-typed webhook ids, methods on open paths) must each get a 4xx; the scheduler's
memory must not grow by the size of a body it refused. Then a property-based fuzzer
(schemathesis) runs every operation of the scheduler's OpenAPI description against it: no
server error, no answer that breaks the description. A summary of what was sent and answered
is printed (pytest -s shows it).
"""

from __future__ import annotations

import collections
import http.client
import io
import itertools
import json
import os
import secrets
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hypothesis
import pytest
import requests
import schemathesis
import waitress
from flask import Flask, Response, jsonify, request
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.cloudutil import free_port
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.wire.agent_protocol import ExitStatus
from ttci.wire.api import API_VERSION
from ttci.wire.commands import ExecEvent
from ttci.wire.openapi_hostd import hostd_openapi
from ttci.wire.openapi_scheduler import scheduler_openapi

JOIN = "join-" + secrets.token_urlsafe(16)
ADMIN = "admin-" + secrets.token_urlsafe(16)
HOSTD = "hostd-" + secrets.token_urlsafe(16)
HOST_TOKEN = "standin-" + secrets.token_urlsafe(16)
IMAGES = ["qemu:debian-12:amd64", "qemu:debian-12:arm64"]
HOST_INFO = {
    "api": API_VERSION,
    "machine": "x86_64",
    "accel": "tcg",
    "total": {"cpus": 4000, "memory_mib": 8_000_000, "disk_gib": 400_000},
    "free": {"cpus": 4000, "memory_mib": 8_000_000, "disk_gib": 400_000},
    "images": [{"name": n, "disk_gib": 4} for n in IMAGES],
}
DEEP = b"[" * 10_000 + b"]" * 10_000
HUGE = "9" * 4000
BIG_BODY = 300 << 20


# -- what was sent and answered ------------------------------------------------------------------
@dataclass
class Tally:
    statuses: dict[str, collections.Counter[int]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    server_errors: list[str] = field(default_factory=list)

    def note(self, service: str, what: str, status: int) -> None:
        self.statuses[service][status] += 1
        if status >= 500:
            self.server_errors.append(f"{service}: {what} -> {status}")

    def report(self) -> str:
        lines = []
        for service, counts in sorted(self.statuses.items()):
            total = sum(counts.values())
            spread = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
            lines.append(f"{service}: {total} requests ({spread})")
        lines.append(f"server errors: {len(self.server_errors)}")
        return "\n".join(lines + self.server_errors)


TALLY = Tally()


def _standin_hostd(port: int) -> Any:
    """Answers what the scheduler asks of a hostd at once (no VM is booted)."""
    app = Flask("hostd-stand-in")

    @app.get("/v1/host")
    def host() -> Response:
        return jsonify(HOST_INFO)

    @app.get("/v1/vms")
    def vms() -> Response:
        return jsonify([])

    @app.post("/v1/vms")
    def create() -> tuple[Response, int]:
        body = request.get_json()
        return jsonify({"id": body["id"], "state": "running", "boot_s": 0.0, "accel": "tcg"}), 201

    @app.route("/v1/vms/<vm_id>", methods=["GET", "DELETE"])
    def one(vm_id: str) -> Any:
        return ("", 204) if request.method == "DELETE" else jsonify({"id": vm_id})

    @app.post("/v1/vms/<vm_id>/exec")
    def exec_(vm_id: str) -> Response:
        lines = [ExecEvent.start().to_dict(), ExecEvent.exit(ExitStatus(code=0)).to_dict()]
        return Response(
            "".join(json.dumps(x) + "\n" for x in lines), mimetype="application/x-ndjson"
        )

    @app.route("/v1/vms/<vm_id>/files", methods=["GET", "PUT"])
    def files(vm_id: str) -> Any:
        if request.method == "PUT":
            return jsonify({"bytes": len(request.get_data()), "dest": request.args["dest"]})
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("hello")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        return Response(buf.getvalue(), mimetype="application/x-tar")

    @app.get("/v1/envs/<env>/egress")
    def egress(env: str) -> Response:
        return jsonify({"mode": "open"})

    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    return server


@dataclass
class Cloud:
    base: str
    pid: int
    tokens: dict[str, str]  # admin, alice, bob
    env: str  # alice's ENV

    def call(self, who: str | None, method: str, path: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if who:
            headers["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        r = requests.request(method, self.base + path, headers=headers, timeout=60, **kw)
        TALLY.note("scheduler", f"{method} {path}", r.status_code)
        return r


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The real scheduler's --database for this module: SQLite (its state dir), or a fresh
    database of the session's throw-away PostgreSQL (tests/pgcluster.py)."""
    if request.param == "sqlite":
        yield ""
        return
    with request.getfixturevalue("pg").database() as url:
        yield url


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Cloud]:
    state = tmp_path_factory.mktemp("inputs")
    standin_port, port = free_port(), free_port()
    standin = _standin_hostd(standin_port)
    argv = [
        *python_main("ttci.scheduler.web.serve"),
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--host-timeout",
        "3600",
        *(["--database", database_url] if database_url else []),
    ]
    env = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN}
    proc = _spawn(argv, env, state / "scheduler.log", "tt-scheduler")
    try:
        c = Cloud(f"http://127.0.0.1:{port}", proc.pid, {"admin": ADMIN}, "alice-env")
        reg = {
            "api": API_VERSION,
            "id": "standin",
            "url": f"http://127.0.0.1:{standin_port}",
            "token": HOST_TOKEN,
            "info": HOST_INFO,
        }
        assert c.call(JOIN, "POST", "/v1/hosts/register", json=reg).status_code == 200
        for name in ("alice", "bob"):
            r = c.call("admin", "POST", "/v1/users", json={"name": name})
            assert r.status_code == 201, r.text
            c.tokens[name] = r.json()["token"]
        body = {"name": c.env, "os_prefix": "debian-12:amd64", "memory_mib": 256, "wait": False}
        r = c.call("alice", "POST", "/v1/envs", json=body)
        assert r.status_code == 201, r.text
        yield c
    finally:
        stop(proc, grace=STOP_GRACE_S)
        standin.close()
        log = (state / "scheduler.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]  # no bug was met on the way


def _raw(cloud: Cloud, who: str, method: str, path: str, body: bytes) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    return cloud.call(who, method, path, data=body, headers=headers)


def _env_body(**fields: Any) -> dict[str, Any]:
    return {"name": "probe-1", "os_prefix": "debian-12:amd64", "wait": False, **fields}


# -- the scheduler ------------------------------------------------------------------------------
NUMBER_PROBES = [
    # (the field, raw JSON text of its value)
    ("cpus", "NaN"),
    ("cpus", "Infinity"),
    ("cpus", "-Infinity"),
    ("cpus", "1e400"),
    ("memory_mib", "1e400"),
    ("memory_mib", HUGE),
    ("disk_gib", HUGE),
    ("dup_each", HUGE),
    ("dup_each", "-" + HUGE),
    ("life_time", HUGE),
    ("life_time", "1e400"),
    ("life_time", "NaN"),
    ("life_time", '"' + HUGE + 'd"'),
    ("max_wait", "Infinity"),
    ("max_wait", HUGE),
    ("memory_mib", '"512"'),
    ("cpus", "true"),
    ("deny_outgoing", '"false"'),
    ("wait", '"false"'),
    ("api", "true"),
    ("vm_ports", '"' + HUGE + '"'),
    ("origin", '{"kind": "cli", "url": "https://example.test/\\n"}'),
]


@pytest.mark.parametrize(
    ("key", "value"), NUMBER_PROBES, ids=[f"{k}={v[:12]}" for k, v in NUMBER_PROBES]
)
def test_env_requests_with_bad_numbers_and_flags_are_400(
    cloud: Cloud, key: str, value: str
) -> None:
    body = json.dumps(_env_body())[:-1] + f', "{key}": {value}}}'
    want = 403 if key == "api" else 400  # another API version is a 403
    r = _raw(cloud, "alice", "POST", "/v1/envs", body.encode())
    assert r.status_code == want, r.text
    r = _raw(cloud, "alice", "POST", "/v1/envs?dry_run=1", body.encode())
    assert r.status_code == want, r.text


def test_names_with_a_trailing_newline_are_refused(cloud: Cloud) -> None:
    r = cloud.call("alice", "POST", "/v1/envs", json=_env_body(name="probe-2\n"))
    assert r.status_code == 400 and "not valid" in r.text
    r = cloud.call("admin", "POST", "/v1/users", json={"name": "eve\n"})
    assert r.status_code == 400
    reg = {"api": 1, "id": "h9\n", "url": "http://127.0.0.1:1", "token": "t" * 20, "info": {}}
    assert cloud.call(JOIN, "POST", "/v1/hosts/register", json=reg).status_code == 400
    reg = {**reg, "id": "h9", "url": "http://127.0.0.1:1\n"}
    assert cloud.call(JOIN, "POST", "/v1/hosts/register", json=reg).status_code == 400
    quota = {"scope": "user", "name": "eve\n", "vms": 1}
    assert cloud.call("admin", "PUT", "/v1/quotas", json=quota).status_code == 400
    assert "h9" not in str(cloud.call("admin", "GET", "/v1/hosts").json())


@pytest.mark.parametrize("admin", ["false", "true", 0, 1, None, "yes", [], {}])
def test_the_admin_flag_is_a_strict_boolean(cloud: Cloud, admin: Any) -> None:
    r = cloud.call("admin", "POST", "/v1/users", json={"name": "eve", "admin": admin})
    assert r.status_code == 400, r.text
    users = cloud.call("admin", "GET", "/v1/users").json()
    assert "eve" not in {u["name"] for u in users}


ROUTES_WITH_BODIES = [
    ("alice", "POST", "/v1/envs"),
    ("alice", "POST", "/v1/envs/alice-env/run"),
    ("alice", "POST", "/v1/envs/alice-env/extend"),
    ("alice", "POST", "/v1/envs/alice-env/result"),
    ("admin", "PUT", "/v1/quotas"),
    ("admin", "POST", "/v1/users"),
    (JOIN, "POST", "/v1/hosts/register"),
    (HOST_TOKEN, "POST", "/v1/hosts/heartbeat"),
]


@pytest.mark.parametrize(
    ("who", "method", "path"),
    ROUTES_WITH_BODIES,
    ids=[f"{m} {p}" for _, m, p in ROUTES_WITH_BODIES],
)
def test_deep_nesting_and_broken_json_are_400(
    cloud: Cloud, who: str, method: str, path: str
) -> None:
    for body in (
        DEEP,
        b'{"a": ' * 5000 + b"1" + b"}" * 5000,
        b'{"name": "\\ud800"}',
        b'{"name": NaN}',
        b"[1, 2",
        b"\xff\xfe",
        HUGE.encode(),
    ):
        r = _raw(cloud, who, method, path, body)
        assert r.status_code == 400, (body[:40], r.text)
    r = cloud.call(
        who,
        method,
        path,
        data=b"{}" + b" " * (9 << 20),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_vm_pages_say_what_the_stream_says(cloud: Cloud) -> None:
    """A page of VMs (SQLite writes it as JSON itself) and the NDJSON stream (read as rows)
    describe every VM the same way, in name order, with the totals and next offsets right."""
    body = _env_body(name="pages", os_prefix="debian-12", dup_each=3, memory_mib=256)
    assert cloud.call("alice", "POST", "/v1/envs", json=body).status_code == 201
    base = "/v1/envs/pages/vms"
    try:
        deadline = time.monotonic() + 30
        while True:
            lines = cloud.call("alice", "GET", f"{base}?stream=1").text.splitlines()
            stream = [json.loads(x) for x in lines]
            if len(stream) == 6 and all(v["state"] == "running" for v in stream):
                break
            assert time.monotonic() < deadline, stream
            time.sleep(0.2)
        first = cloud.call("alice", "GET", f"{base}?limit=4").json()
        rest = cloud.call("alice", "GET", f"{base}?limit=4&offset=4").json()
        assert (first["env"], first["total"], first["offset"], first["next_offset"]) == (
            "pages",
            6,
            0,
            4,
        )
        assert (rest["total"], rest["offset"], rest["next_offset"]) == (6, 4, None)
        assert first["vms"] + rest["vms"] == stream
        assert [v["name"] for v in stream] == sorted(v["name"] for v in stream)
        assert {"name", "image", "host", "state", "cpus", "ip", "ports", "error"} <= set(stream[0])
        assert cloud.call("alice", "GET", f"{base}?offset=6").json()["vms"] == []
        assert cloud.call("bob", "GET", base).status_code == 404  # not bob's
    finally:
        cloud.call("alice", "DELETE", "/v1/envs/pages")


@pytest.mark.parametrize(
    "query",
    [
        "offset=abc",
        "offset=-1",
        "limit=0",
        "limit=-5",
        "limit=1.5",
        f"offset={HUGE}",
        "offset=1e3",
        "limit=%EF%BC%91",
        "offset=%00",
    ],
)
def test_paging_parameters_must_be_integers_in_range(cloud: Cloud, query: str) -> None:
    for path in ("/v1/envs", "/v1/envs/alice-env/vms", "/v1/jobs"):
        if "offset" in query and path == "/v1/jobs":
            continue
        r = cloud.call("alice", "GET", f"{path}?{query}")
        assert r.status_code == 400, (path, query, r.text)


def test_guest_paths_are_checked(cloud: Cloud) -> None:
    for query in ("path=etc", "path=/etc%00x", "path=" + "/a" * 3000):
        assert cloud.call("alice", "GET", f"/v1/envs/alice-env/files?{query}").status_code == 400
    assert (
        cloud.call("alice", "PUT", "/v1/envs/alice-env/files?dest=rel", data=b"x").status_code
        == 400
    )


def test_open_paths_are_open_for_their_method_only(cloud: Cloud) -> None:
    for method, path in (
        ("DELETE", "/v1/hosts/register"),
        ("DELETE", "/v1/hosts/heartbeat"),
        ("DELETE", "/v1/health"),
        ("POST", "/v1/health"),
        ("PUT", "/v1/openapi.json"),
        ("GET", "/v1/hosts/register"),
        ("POST", "/v1/hosts/register/drain"),
        ("GET", "/v1/nothing-here"),
    ):
        r = cloud.call(None, method, path)
        assert r.status_code == 401, (method, path, r.text)
    assert cloud.call(None, "GET", "/v1/health").status_code == 200
    # With a user's token the view is reached, and says no.
    assert cloud.call("bob", "DELETE", "/v1/hosts/register").status_code == 403
    r = cloud.call("bob", "PATCH", "/v1/envs")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def _send_big(cloud: Cloud, who: str, path: str, size: int, chunked: bool = False) -> int:
    """PUT size bytes to path, streamed (the test never holds them); returns the status."""
    url = urlsplit(cloud.base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=120)
    conn.putrequest("PUT", path)
    conn.putheader("Authorization", f"Bearer {cloud.tokens[who]}")
    conn.putheader("Content-Type", "application/x-tar")
    conn.putheader(
        "Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size)
    )
    conn.endheaders()
    chunk = b"\0" * (1 << 20)
    try:
        for _ in range(size // len(chunk)):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the whole body was taken
    status = conn.getresponse().status
    conn.close()
    TALLY.note("scheduler", f"PUT {path} ({size} bytes)", status)
    return status


def test_a_big_body_for_an_env_that_is_not_yours_is_refused_unread(cloud: Cloud) -> None:
    before = _rss_kib(cloud.pid)
    path = f"/v1/envs/{cloud.env}/files?dest=/root"
    assert _send_big(cloud, "bob", path, BIG_BODY) == 404
    assert _send_big(cloud, "bob", path, BIG_BODY, chunked=True) == 404
    r = cloud.call(
        "bob",
        "POST",
        f"/v1/envs/{cloud.env}/run",
        data=b"[" * (20 << 20),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 404
    grown = (_rss_kib(cloud.pid) - before) >> 10
    print(f"\nscheduler RSS growth over 2 x 300 MB refused pushes and a 20 MB run: {grown} MiB")
    assert grown < 64, f"the scheduler grew by {grown} MiB"
    # Its owner's push of a body over the limit is refused by size (waitress or the API).
    assert _send_big(cloud, "alice", path, 0) == 200


# -- the admin page's actions ----------------------------------------------------------------------
def _admin_session(cloud: Cloud) -> tuple[requests.Session, str]:
    """Logged in as a browser is; returns the session and the page's CSRF token."""
    s = requests.Session()
    page = s.get(cloud.base + "/admin/login", timeout=30).text
    field = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    r = s.post(cloud.base + "/admin/login", data={"token": ADMIN, "csrf_token": field}, timeout=30)
    assert r.status_code == 200 and "/admin/login" not in r.url, r.text[:300]
    index = s.get(cloud.base + "/admin/", timeout=30).text
    return s, index.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


ADMIN_PROBES = [
    ("/admin/api/envs/alice-env/extend", b'{"add": NaN}'),
    ("/admin/api/envs/alice-env/extend", b'{"add": 1e400}'),
    ("/admin/api/envs/alice-env/extend", b'{"life_time": Infinity}'),
    ("/admin/api/envs/alice-env/extend", b'{"life_time": ' + HUGE.encode() + b"}"),
    ("/admin/api/envs/alice-env/extend", b'{"life_time": "' + HUGE.encode() + b'd"}'),
    ("/admin/api/envs/alice-env/extend", b'{"add": true}'),
    ("/admin/api/envs/alice-env/extend", b"[1]"),
    ("/admin/api/envs/alice-env/extend", DEEP),
    ("/admin/api/quotas", b'{"scope": "user", "name": "alice", "cpus": NaN}'),
    ("/admin/api/quotas", b'{"scope": "user", "name": "alice", "vms": ' + HUGE.encode() + b"}"),
    ("/admin/api/quotas", b'{"scope": "user", "name": "alice", "vms": true}'),
    ("/admin/api/quotas", b'{"scope": "user", "name": "alice\\n", "vms": 1}'),
    ("/admin/api/quotas", DEEP),
    ("/admin/api/quotas/delete", b'{"scope": "user", "name": NaN}'),
    ("/admin/api/hosts/standin/drain", b'{"drained": "false"}'),
    ("/admin/api/hosts/standin/drain", b'{"drained": 0}'),
    ("/admin/api/hosts/standin/drain", b"{" * 100),
]


def test_admin_actions_refuse_bad_numbers_flags_and_nesting(cloud: Cloud) -> None:
    s, csrf = _admin_session(cloud)
    headers = {"X-CSRFToken": csrf, "Content-Type": "application/json"}
    for path, body in ADMIN_PROBES:
        r = s.post(cloud.base + path, data=body, headers=headers, timeout=30)
        TALLY.note("scheduler (admin page)", f"POST {path}", r.status_code)
        assert r.status_code == 400, (path, body[:60], r.text)
        assert r.headers["Content-Type"].startswith("application/json")
    r = s.post(cloud.base + "/admin/api/quotas", data=b"x" * (1 << 20), headers=headers, timeout=30)
    TALLY.note("scheduler (admin page)", "POST /admin/api/quotas (1 MiB)", r.status_code)
    assert r.status_code in (400, 413)
    hosts = cloud.call("admin", "GET", "/v1/hosts").json()
    assert not any(h["drained"] for h in hosts)  # "false" never drained anything


# -- hostd ----------------------------------------------------------------------------------------
@dataclass
class Hostd:
    base: str
    pid: int

    def call(
        self, method: str, path: str, token: str | None = HOSTD, **kw: Any
    ) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        r = requests.request(method, self.base + path, headers=headers, timeout=60, **kw)
        TALLY.note("hostd", f"{method} {path}", r.status_code)
        return r


@pytest.fixture(scope="module")
def hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    """A real tt-hostd (its own libvirtd, no images: nothing can boot), joined to nothing."""
    state = tmp_path_factory.mktemp("hostd")
    (state / "images").mkdir()
    port = free_port()
    argv = [
        *python_main("hostd.cli.main"),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state / "state"),
        "--image-path",
        str(state / "images"),
        "--host-id",
        "probe-host",
        "--private-libvirtd",
        "--cpu-total",
        "4",
        "--mem-total",
        "4096",
    ]
    proc = _spawn(argv, {**BASE_ENV, "TT_HOSTD_TOKEN": HOSTD}, state / "hostd.log", "tt-hostd")
    try:
        yield Hostd(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        stop(proc, grace=STOP_GRACE_S)
        log = (state / "hostd.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


def _vm(**fields: Any) -> dict[str, Any]:
    return {"env": "e1", "name": "vm-1", "image": "qemu:debian-12:amd64", **fields}


HOSTD_BODIES = [
    b'{"env": "e1", "name": "vm-1", "image": "qemu:debian-12:amd64", "cpus": NaN}',
    b'{"env": "e1", "name": "vm-1", "image": "qemu:debian-12:amd64", "cpus": Infinity}',
    b'{"env": "e1", "name": "vm-1", "image": "qemu:debian-12:amd64", "cpus": 1e400}',
    b'{"env": "e1", "name": "vm-1", "image": "qemu:debian-12:amd64", "memory_mib": '
    + HUGE.encode()
    + b"}",
    json.dumps(_vm(id="../../x")).encode(),
    json.dumps(_vm(id="a/b")).encode(),
    json.dumps(_vm(id="vm\n")).encode(),
    json.dumps(_vm(name="vm-1\n")).encode(),
    json.dumps(_vm(deny_outgoing="false")).encode(),
    json.dumps(_vm(ports=HUGE)).encode(),
    json.dumps(_vm(env=["e1"])).encode(),
    DEEP,
]


def test_hostd_refuses_bad_vm_requests(hostd: Hostd) -> None:
    headers = {"Content-Type": "application/json"}
    for body in HOSTD_BODIES:
        r = hostd.call("POST", "/v1/vms", data=body, headers=headers)
        assert r.status_code == 400, (body[:80], r.text)
    for body in (
        DEEP,
        b'{"argv": ["true"], "timeout": NaN}',
        b'{"argv": ["true"], "timeout": 1e300}',
    ):
        r = hostd.call("POST", "/v1/vms/nope/exec", data=body, headers=headers)
        assert r.status_code in (400, 404), r.text
    assert hostd.call("GET", "/v1/vms").json() == []  # nothing was made


def test_hostd_open_routes_and_paths(hostd: Hostd) -> None:
    assert hostd.call("GET", "/v1/health", token=None).status_code == 200
    assert hostd.call("GET", "/v1/openapi.json", token=None).status_code == 200
    assert hostd.call("GET", "/metrics", token=None).status_code == 200
    for method, path in (("DELETE", "/v1/health"), ("POST", "/metrics"), ("GET", "/v1/vms")):
        assert hostd.call(method, path, token=None).status_code == 401
    assert hostd.call("GET", "/v1/vms/nope/files?path=etc").status_code in (400, 404)
    assert hostd.call("GET", "/v1/vms/nope").status_code == 404
    assert hostd.call("DELETE", "/v1/vms/..%2F..%2Fx").status_code == 404


def test_hostd_refuses_a_big_push_to_a_vm_it_does_not_have_unread(hostd: Hostd) -> None:
    before = _rss_kib(hostd.pid)
    url = urlsplit(hostd.base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=120)
    conn.putrequest("PUT", "/v1/vms/nope/files?dest=/root")
    conn.putheader("Authorization", f"Bearer {HOSTD}")
    conn.putheader("Content-Length", str(BIG_BODY))
    conn.endheaders()
    chunk = b"\0" * (1 << 20)
    for _ in range(BIG_BODY // len(chunk)):
        conn.send(chunk)
    status = conn.getresponse().status
    conn.close()
    TALLY.note("hostd", "PUT 300 MB", status)
    assert status == 404
    grown = (_rss_kib(hostd.pid) - before) >> 10
    print(f"\nhostd RSS growth over a 300 MB refused push: {grown} MiB")
    assert grown < 64


# -- the GitHub webhook service ------------------------------------------------------------------
WEBHOOK_SECRET = b"webhook-secret-for-probes-" + secrets.token_hex(8).encode()
OURS = ["self-hosted", "tt", "debian-12", "arm64"]


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.github.standin import StandIn
    from tests.github.util import app_keys, serving
    from ttci.client.config import ClientConfig
    from ttci.client.scheduler import Client
    from webhooks.app import create_app
    from webhooks.github_api import GitHubAPI, GitHubConfig
    from webhooks.service import Service, Settings
    from webhooks.store import JobStore

    tmp = tmp_path_factory.mktemp("webhook")
    key, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    api = GitHubAPI(GitHubConfig(base_url=gh.url, app_id="31337", private_key=key))
    tt = Client(ClientConfig("127.0.0.1:9", "tt-token"))  # nothing listens: never provisioned
    svc = Service(Settings(reconcile_interval_s=3600), JobStore(tmp / "github.db"), api, tt)
    try:
        with serving(create_app(svc, WEBHOOK_SECRET)) as url:
            yield url
    finally:
        svc.stop()
        api.close()
        gh.stop()


def _deliver(url: str, raw: bytes, **headers: str) -> int:
    from tests.github.payloads import headers as gh_headers

    h = {**gh_headers("workflow_job", raw, WEBHOOK_SECRET), **headers}
    r = requests.post(url + "/webhook", data=raw, headers=h, timeout=30)
    TALLY.note("webhooks", "POST /webhook", r.status_code)
    assert r.headers["Content-Type"].startswith("application/json"), r.text
    return r.status_code


def _job_with(**changes: Any) -> bytes:
    from tests.github.payloads import job_event

    ev = job_event("queued", 7001, OURS)
    for path, value in changes.items():
        target = ev
        *parents, last = path.split("__")
        for p in parents:
            target = target[p]
        target[last] = value
    return json.dumps(ev).encode()


WRONG_TYPES = {
    "workflow_job__id": ["7001", True, 7001.5, None, [7001], {"id": 1}, -1, 0, 2**64],
    "workflow_job__run_id": ["5", True, {"x": 1}, 2**70],
    "workflow_job__labels": ["tt", [1, 2], [["x"]], None, ["x" * 500]],
    "installation": ["x", 5, [1]],
    "installation__id": ["4242", True, 4.5],
    "repository__full_name": [5, None, ["a/b"]],
    "action": [1, None],
    "workflow_job": ["x", [], None],
}


def test_webhook_payloads_of_the_wrong_shape_are_400(webhook: str) -> None:
    for path, values in WRONG_TYPES.items():
        for value in values:
            assert _deliver(webhook, _job_with(**{path: value})) == 400, (path, value)
    good = _job_with()
    for raw in (
        good.replace(b'"id": 7001', b'"id": NaN', 1),
        good.replace(b'"id": 7001', b'"id": Infinity', 1),
        good.replace(b'"id": 7001', b'"id": 1e400', 1),
        good.replace(b'"id": 7001', b'"id": ' + HUGE.encode(), 1),
        b'{"action": "queued", "workflow_job": ' + DEEP + b"}",
        b'{"action": "queued", "x": "\\ud800"}',
        b"[1,",
    ):
        assert _deliver(webhook, raw) == 400, raw[:80]
    assert _deliver(webhook, good, **{"X-GitHub-Delivery": "not a guid!"}) == 400
    assert _deliver(webhook, good, **{"Content-Type": "text/plain"}) == 415
    big = b'{"a": "' + b"x" * (26 << 20) + b'"}'
    assert _deliver(webhook, big) == 413


# -- the fuzzer -----------------------------------------------------------------------------------
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Examples per operation and phase: the whole module takes about 1.5 minutes here.
MAX_EXAMPLES = int(os.environ.get("TT_FUZZ_EXAMPLES", "100"))


@schemathesis.serializer("application/x-tar")
def _tar(context: Any, value: Any) -> bytes:
    data = getattr(value, "data", value)  # schemathesis' Binary, or anything generated
    return data if isinstance(data, bytes) else json.dumps(data).encode()


FUZZ_CONFIG = {
    "seed": int(os.environ.get("TT_FUZZ_SEED", "20240601")),  # another seed explores more
    "generation": {
        "mode": "all",  # valid requests and invalid ones
        "database": "none",
        "allow-extra-parameters": False,  # unknown query parameters are ignored, by design
        "with-security-parameters": False,  # the test sends the tokens itself
    },
    "phases": {"stateful": {"enabled": False}},
}
# The descriptions are data: loaded at collection (the served copies are the same,
# tests/test_openapi.py); every operation becomes a test of its own.
fuzzed = schemathesis.openapi.from_dict(
    scheduler_openapi(), config=schemathesis.Config.from_dict(FUZZ_CONFIG)
)
fuzzed_hostd = schemathesis.openapi.from_dict(
    hostd_openapi(), config=schemathesis.Config.from_dict(FUZZ_CONFIG)
)
_turns = itertools.count()


def _tame(case: Any, env: str) -> None:
    """Keep generated ENVs small and never waiting: the stand-in host makes each VM at once, but
    100,000 of them, or a request queued until capacity frees, would only cost time. Half the
    requests about one ENV (but deletes) go to a real one, so they get past its lookup."""
    params = case.path_parameters or {}
    about_env = case.path.startswith("/v1/envs/{name}") and case.method != "DELETE"
    if about_env and "name" in params and next(_turns) % 2:
        params["name"] = env
    body = case.body
    if case.method == "POST" and case.path == "/v1/envs" and isinstance(body, dict):
        if isinstance(body.get("dup_each"), int) and not isinstance(body["dup_each"], bool):
            body["dup_each"] = max(min(body["dup_each"], 2), -1)
        if body.get("wait", True) is True:
            body["wait"] = False


@fuzzed.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_fuzz_the_scheduler(case: Any, cloud: Cloud) -> None:
    # Host routes get a token that is not the pool's: a fuzzed registration must never make the
    # scheduler reach out to a generated address. Everything else runs as the admin.
    host_route = case.path in ("/v1/hosts/register", "/v1/hosts/heartbeat")
    who = "alice" if next(_turns) % 3 == 0 else "admin"  # a third as a user without rights
    token = cloud.tokens["bob" if host_route else who]
    _tame(case, cloud.env)
    headers = {"Authorization": f"Bearer {token}"}
    response = case.call(base_url=cloud.base, headers=headers, timeout=60)
    TALLY.note("scheduler (fuzzer)", f"{case.method} {case.path}", response.status_code)
    case.validate_response(response, checks=CHECKS, headers=headers)


@fuzzed_hostd.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES // 4,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_fuzz_hostd(case: Any, hostd: Hostd) -> None:
    """hostd has no images here: nothing a fuzzed request asks for can boot."""
    headers = {"Authorization": f"Bearer {HOSTD}"}
    response = case.call(base_url=hostd.base, headers=headers, timeout=60)
    TALLY.note("hostd (fuzzer)", f"{case.method} {case.path}", response.status_code)
    case.validate_response(response, checks=CHECKS, headers=headers)


def test_report(cloud: Cloud) -> None:
    """Runs last in this module: what every service was sent and answered."""
    print("\n" + TALLY.report())
    assert TALLY.server_errors == []


# -- the strict body reader itself (ttci/infra/http_server.py) -------------------------------------
def test_body_limits_are_checked_before_reading_and_while_reading() -> None:
    from ttci.infra.http_server import install_errors, json_body, read_body
    from ttci.model.errors import BadInput

    app = Flask("limits")
    install_errors(app, {BadInput: 400})
    app.add_url_rule("/raw", "raw", lambda: jsonify(len(read_body(100))), methods=["PUT"])
    app.add_url_rule("/json", "json", lambda: jsonify(json_body(100)), methods=["POST"])

    @app.get("/bug")
    def bug() -> Response:
        raise KeyError("a bug")

    c = app.test_client()

    class Untouchable(io.RawIOBase):
        def readinto(self, b: Any) -> int:
            raise AssertionError("the body was read")

    big = {"wsgi.input": Untouchable(), "CONTENT_LENGTH": str(300 << 20)}
    assert c.put("/raw", environ_overrides=big).status_code == 413
    # Without a length (chunked): counted while reading, refused past the limit.
    for size, status in ((101, 413), (100, 200), (10_000_000, 413)):
        chunked = {
            "wsgi.input": io.BytesIO(b"x" * size),
            "wsgi.input_terminated": True,  # as waitress says of a chunked body
            "CONTENT_LENGTH": "",
            "HTTP_TRANSFER_ENCODING": "chunked",
        }
        assert c.put("/raw", environ_overrides=chunked).status_code == status, size
    assert c.post("/json", json={"a": "x" * 200}).status_code == 413
    assert c.post("/json", data=b'{"a": 1}', content_type="text/plain").status_code == 400
    assert c.post("/json", json={"a": 1}).json == {"a": 1}
    r = c.get("/json")
    assert r.status_code == 405 and r.headers["Allow"] and r.json["error"]

    r = c.get("/bug")
    assert r.status_code == 500 and "bug" in r.json["error"] and "KeyError" not in r.text
