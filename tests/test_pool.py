"""The pool for real: hostds that join the scheduler with a join token, heartbeats, a host that
stops answering, draining, incompatible or unauthorised hosts, and per-user tokens. Real daemons
on loopback; no VMs are booted here (see test_multihost.py for those)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.cloudutil import free_port
from tests.conftest import IMAGE_PATH
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop

JOIN = "join-" + secrets.token_urlsafe(12)
ADMIN = "admin-" + secrets.token_urlsafe(12)


def wait_for(cond: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Api:
    def __init__(self, addr: str, token: str) -> None:
        self.base = f"http://{addr}"
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kw: object) -> requests.Response:
        return self.s.request(method, self.base + path, timeout=30, **kw)  # type: ignore[arg-type]

    def stream(self, method: str, path: str, **kw: object) -> requests.Response:
        return self.s.request(  # type: ignore[arg-type]
            method, self.base + path, timeout=30, stream=True, **kw
        )

    def hosts(self) -> dict[str, dict[str, object]]:
        return {h["id"]: h for h in self("GET", "/v1/hosts").json()}


def hostd_argv(state: Path, port: int, host_id: str, sched: str, token: str) -> list[str]:
    return [
        *python_main("hostd.cli.main"),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--image-path",
        str(IMAGE_PATH),
        "--host-id",
        host_id,
        "--private-libvirtd",
        "--cpu-total",
        "4",
        "--mem-total",
        "4096",
        "--join",
        sched,
        "--join-token",
        token,
    ]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    state = tmp_path_factory.mktemp("pool")
    sched = f"127.0.0.1:{free_port()}"
    env = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN}
    argv = [
        *python_main("ttci.scheduler.web.serve"),
        "--listen",
        sched,
        "--state-dir",
        str(state),
        "--host-timeout",
        "3",
    ]
    proc = _spawn(argv, env, state / "scheduler.log", "tt-scheduler")
    hostds: list[subprocess.Popen[bytes]] = []
    try:
        for hid in ("h1", "h2"):
            hostds.append(
                _spawn(
                    hostd_argv(state / hid, free_port(), hid, sched, JOIN),
                    {**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24)},
                    state / f"{hid}.log",
                    "tt-hostd",
                )
            )
        yield sched, state
    finally:
        for p in hostds:
            os.kill(p.pid, signal.SIGCONT)
            stop(p, grace=STOP_GRACE_S)
        stop(proc, grace=STOP_GRACE_S)


def test_hosts_join_and_the_catalogue_is_their_union(pool: tuple[str, Path]) -> None:
    api = Api(pool[0], ADMIN)
    wait_for(lambda: {"h1", "h2"} <= set(api.hosts()), what="both hosts to register")
    hosts = api.hosts()
    assert all(hosts[h]["state"] == "up" and hosts[h]["kind"] == "registered" for h in hosts)
    assert "token" not in str(hosts)  # the hosts' own tokens are never shown
    images = {i["name"]: set(i["hosts"]) for i in api("GET", "/v1/images").json()}
    assert images and all(hs == {"h1", "h2"} for hs in images.values())


def test_wrong_join_token_stops_the_host_with_a_clear_error(pool: tuple[str, Path]) -> None:
    sched, state = pool
    r = subprocess.run(
        hostd_argv(state / "bad", free_port(), "bad", sched, "not-the-token"),
        env={**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode != 0
    assert "wrong join token" in r.stderr and "--join-token" in r.stderr
    assert "bad" not in Api(sched, ADMIN).hosts()


def test_incompatible_or_malformed_registrations_are_refused(pool: tuple[str, Path]) -> None:
    sched = pool[0]
    join = Api(sched, JOIN)
    body = {"id": "old", "url": "http://127.0.0.1:9", "api": 99, "token": "x" * 20, "info": {}}
    r = join("POST", "/v1/hosts/register", json=body)
    assert r.status_code == 403 and "API version 99" in r.json()["error"]
    r = join("POST", "/v1/hosts/register", json={**body, "api": 1, "url": "ftp://x"})
    assert r.status_code == 400 and "http://ADDR:PORT" in r.json()["error"]
    # A user token is no join token, and a join token is no user token.
    r = Api(sched, ADMIN)("POST", "/v1/hosts/register", json={**body, "api": 1})
    assert r.status_code == 403
    assert join("GET", "/v1/envs").status_code == 401
    assert "old" not in Api(sched, ADMIN).hosts()


def test_drain_keeps_the_host_but_takes_it_out_of_placement(pool: tuple[str, Path]) -> None:
    api = Api(pool[0], ADMIN)
    wait_for(lambda: {"h1", "h2"} <= set(api.hosts()), what="hosts")
    for hid in ("h1", "h2"):
        assert api("POST", f"/v1/hosts/{hid}/drain").json()["drained"] is True
    body = {"name": "nowhere", "os_prefix": "debian-12:amd64"}
    r = api("POST", "/v1/envs", json={**body, "wait": False})
    assert r.status_code == 409, r.text
    assert "no host" in r.json()["error"]
    assert api("GET", "/v1/envs/nowhere").status_code == 404  # nothing half-made
    # Waiting is the default: the request queues for a drained host to come back.
    with api.stream("POST", "/v1/envs?progress=1", json=body) as s:
        lines = s.iter_lines()
        first = json.loads(next(lines))
        assert first["event"] == "queued" and first["blocked_by"] == "no_host", first
        shown = api("GET", "/v1/envs/nowhere").json()
        assert shown["state"] == "queued" and shown["queue"]["position"] == 1, shown
        assert [q["env"] for q in api("GET", "/v1/queue").json()] == ["nowhere"]
        assert api("DELETE", "/v1/envs/nowhere").json()["was"] == "queued"
        rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["event"] == "error" and "cancelled" in rest[-1]["error"], rest
    assert api("GET", "/v1/envs/nowhere").status_code == 404
    assert api("GET", "/v1/queue").json() == []
    for hid in ("h1", "h2"):
        assert api("POST", f"/v1/hosts/{hid}/undrain").json()["drained"] is False
    assert api("POST", "/v1/hosts/nope/drain").status_code == 404


def test_a_host_that_stops_answering_is_marked_down_and_comes_back(
    pool: tuple[str, Path],
) -> None:
    api = Api(pool[0], ADMIN)
    wait_for(lambda: {"h1", "h2"} <= set(api.hosts()), what="hosts")
    pid = int(
        subprocess.run(
            ["pgrep", "-f", "--", "--host-id h2 "], capture_output=True, text=True, check=False
        ).stdout.split()[0]
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: api.hosts()["h2"]["state"] == "down", timeout=20, what="h2 down")
        assert "heartbeat" in str(api.hosts()["h2"]["error"])
        assert api.hosts()["h1"]["state"] == "up"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: api.hosts()["h2"]["state"] == "up", timeout=20, what="h2 back")


def test_users_have_their_own_tokens_and_admin_rights(pool: tuple[str, Path]) -> None:
    admin = Api(pool[0], ADMIN)
    r = admin("POST", "/v1/users", json={"name": "alice"})
    assert r.status_code == 201
    alice = Api(pool[0], r.json()["token"])
    assert alice("GET", "/v1/status").json()["user"] == "alice"
    assert alice("GET", "/v1/users").status_code == 403
    assert alice("POST", "/v1/hosts/h1/drain").status_code == 403
    assert admin("POST", "/v1/users", json={"name": "alice"}).status_code == 409
    assert admin("POST", "/v1/users", json={"name": "Bad Name"}).status_code == 400
    assert "token" not in str(admin("GET", "/v1/users").json())
    assert admin("DELETE", "/v1/users/alice").status_code == 200
    assert alice("GET", "/v1/status").status_code == 401
