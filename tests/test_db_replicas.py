"""Two real tt-scheduler processes on one throw-away PostgreSQL (tests/pgcluster.py): what one
replica writes the other serves (users, admin sessions), the background loops run on exactly
one of them, and when that one is SIGKILLed the other takes its leases over within seconds
(the time itself is measured by bench/scheduler.py, not asserted here). Also: the leases and
the place mutex on the layer itself, with concurrent holders, and a burst of ENV requests to two
schedulers on one database against a small stand-in host: no VM placed past its capacity, each
request granted once."""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from tests.replicautil import ADMIN, JOIN, SchedulerProc, start_scheduler
from ttci.infra.proc import stop
from ttci.infra.sql import SqlStore, mask_url
from ttci.infra.sql_leases import Leases, create_table
from ttci.model.errors import TTError
from ttci.scheduler import admission_store as qs
from ttci.scheduler import history
from ttci.scheduler.service import Scheduler
from ttci.scheduler.users import User
from ttci.wire.api import API_VERSION
from ttci.wire.envs import EnvRequest
from ttci.wire.hosts import Heartbeat, HostRegistration

LOOPS = ("dispatcher", "hosts", "reaper")
DATA = Path(__file__).parent / "data"


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[list[SchedulerProc]]:
    started: list[SchedulerProc] = []
    try:
        # Started together: both migrate the empty database at once (one does, one waits).
        threads = [
            threading.Thread(
                target=lambda i=i: started.append(
                    start_scheduler(tmp_path / f"r{i}", "--database", pg_url)
                )
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(started) == 2, "a replica did not start (see its log under tmp_path)"
        yield started
    finally:
        for r in started:
            r.stop()
    for log in tmp_path.glob("r*/scheduler-*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_either_replica_serves_what_the_other_wrote(replicas: list[SchedulerProc]) -> None:
    a, b = replicas
    r = requests.post(a.url + "/v1/users", json={"name": "alice"}, headers=_auth(ADMIN), timeout=10)
    assert r.status_code == 201, r.text
    alice = r.json()["token"]
    r = requests.get(b.url + "/v1/status", headers=_auth(alice), timeout=10)
    assert r.status_code == 200, r.text
    again = requests.post(
        b.url + "/v1/users", json={"name": "alice"}, headers=_auth(ADMIN), timeout=10
    )
    assert again.status_code == 409 and "exists" in again.json()["error"]
    # An admin page session started on one replica is accepted by the other, and ends on both.
    with requests.Session() as browser:
        form = browser.get(a.url + "/admin/login", timeout=10).text
        field = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert field, "the login form carries its CSRF token"
        page = browser.post(
            b.url + "/admin/login",  # the form from one replica is taken by the other
            data={"token": ADMIN, "csrf_token": field.group(1)},
            timeout=10,
        )
        assert page.status_code == 200 and page.url.endswith("/admin/"), page.url
        cookies = {k: v or "" for k, v in browser.cookies.get_dict().items()}
        state = requests.get(a.url + "/admin/api/state", cookies=cookies, timeout=10)
        assert state.status_code == 200, state.text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf, "the admin page carries its CSRF token"
        out = requests.post(
            b.url + "/admin/logout",
            cookies=cookies,
            headers={"X-CSRFToken": csrf.group(1)},
            data={"csrf_token": csrf.group(1)},
            allow_redirects=False,
            timeout=10,
        )
        assert out.status_code == 302, out.text
        gone = requests.get(a.url + "/admin/api/state", cookies=cookies, timeout=10)
        assert gone.status_code == 401


def test_the_loops_move_to_the_other_replica_when_their_holder_is_killed(
    replicas: list[SchedulerProc],
) -> None:
    a, b = replicas
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and a.held() | b.held() != set(LOOPS):
        time.sleep(0.2)
    held = {r.url: r.held() for r in replicas}
    assert held[a.url] | held[b.url] == set(LOOPS) and not held[a.url] & held[b.url], held
    victim, survivor = (a, b) if held[a.url] else (b, a)
    stop(victim.proc, grace=0)  # SIGKILL: it renews nothing more
    killed = time.monotonic()
    while time.monotonic() - killed < 15 and survivor.held() != set(LOOPS):
        time.sleep(0.2)
    assert survivor.held() == set(LOOPS), "the survivor did not take the loops over"
    ready = requests.get(survivor.url + "/readyz", timeout=10).json()
    assert ready["checks"]["leases"]["detail"].count("this replica") == len(LOOPS), ready


def test_a_lease_has_one_holder_and_an_expired_one_is_taken(pg_url: str, tmp_path: Path) -> None:
    stores = [SqlStore(pg_url, [("0001_leases", create_table)]) for _ in range(3)]
    try:
        keepers = [Leases(s, ("x",), ttl=1.0) for s in stores]
        rounds = [threading.Thread(target=k.tick) for k in keepers for _ in range(3)]
        for t in rounds:
            t.start()
        for t in rounds:
            t.join()
        holders = [k for k in keepers if k.held("x")]
        assert len(holders) == 1
        winner = holders[0]
        time.sleep(1.2)  # the winner renews nothing: its lease expires
        other = next(k for k in keepers if k is not winner)
        other.tick()
        assert other.held("x") and not winner.held("x")
        assert other.holders()["x"]["holder"] == other.holder
        winner.tick()  # the old holder comes back: it does not take it again
        assert not winner.held("x")
    finally:
        for s in stores:
            s.close()


def test_the_place_mutex_excludes_across_processes_connections(pg_url: str) -> None:
    """store.mutex is held per database, not per process: two stores (as two replicas) never
    run the section at once."""
    stores = [SqlStore(pg_url, []) for _ in range(2)]
    inside: list[int] = []
    overlap: list[bool] = []

    def work(s: SqlStore) -> None:
        for _ in range(20):
            with s.mutex("place"):
                inside.append(1)
                overlap.append(len(inside) > 1)
                time.sleep(0.002)
                inside.pop()

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(overlap) == 40 and not any(overlap)
    finally:
        for s in stores:
            with contextlib.suppress(Exception):
                s.close()


@dataclass
class Host:
    """A hostd stand-in of 4 CPUs that creates and deletes VMs at once, counting them."""

    url: str = ""
    created: list[str] = field(default_factory=list)
    alive: set[str] = field(default_factory=set)
    most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


CAPACITY = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100}
HOST_INFO = {
    "api": API_VERSION,
    "total": CAPACITY,
    "free": CAPACITY,  # it never says less: what the schedulers committed is what limits them
    "images": [{"name": "qemu:debian-12:amd64", "disk_gib": 4}],
}


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    app = Flask("hostd-stand-in")
    app.add_url_rule("/v1/host", "host", lambda: jsonify(HOST_INFO))
    app.add_url_rule("/v1/vms", "vms", lambda: jsonify([]))

    @app.post("/v1/vms")
    def create() -> tuple[Response, int]:
        vm_id = request.get_json()["id"]
        with h.lock:
            h.created.append(vm_id)
            h.alive.add(vm_id)
            h.most = max(h.most, len(h.alive))
        return jsonify({"id": vm_id, "state": "running", "boot_s": 0.0, "accel": "tcg"}), 201

    @app.delete("/v1/vms/<vm_id>")
    def delete(vm_id: str) -> tuple[str, int]:
        with h.lock:
            h.alive.discard(vm_id)
        return "", 204

    server = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    h.url = f"http://127.0.0.1:{server.server_port}"
    yield h
    server.shutdown()
    t.join()


def test_two_replicas_never_place_past_the_capacity_and_grant_each_request_once(
    tmp_path: Path, pg_url: str, host: Host
) -> None:
    """A burst of 1-CPU ENVs on a 4-CPU host, submitted to two schedulers on one database at
    once: never more than 4 VMs at a time, every request granted exactly once as capacity frees."""
    reps = [
        Scheduler(tmp_path / f"s{i}", {}, admin_token=ADMIN, join_token=JOIN, database=pg_url)
        for i in range(2)
    ]
    try:
        reg = {"api": API_VERSION, "id": "h1", "url": host.url, "token": "h" * 20}
        reps[0].pool.register(HostRegistration.from_dict({**reg, "info": HOST_INFO}))
        for s in reps:
            s.leases.start()
            s.start_dispatcher()
        alice = User("alice", admin=False)
        names = [f"burst-{i}" for i in range(12)]
        body = {"os_prefix": "debian-12:amd64", "cpus": 1, "memory_mib": 256}
        with ThreadPoolExecutor(12) as pool:  # all at once, half to each replica
            list(
                pool.map(
                    lambda i: reps[i % 2].submit_env(
                        EnvRequest.from_dict({**body, "name": names[i]}), alice
                    ),
                    range(12),
                )
            )
        ready: list[str] = []
        deadline = time.monotonic() + 60
        while len(ready) < 12 and time.monotonic() < deadline:
            states = {e["name"]: e["state"] for e in reps[0].list_envs(alice)}
            assert (
                list(states.values()).count("ready") + list(states.values()).count("creating") <= 4
            ), states
            for name, state in states.items():
                if state == "ready" and name not in ready:
                    ready.append(name)
                    reps[len(ready) % 2].delete_env(name, alice)  # frees room on either replica
            time.sleep(0.05)
        assert sorted(ready) == sorted(names)
        assert len(host.created) == 12 and len(set(host.created)) == 12  # each granted once
        assert host.most <= 4 and not host.alive
    finally:
        for s in reps:
            s.close()


def test_an_env_asked_while_the_only_host_is_briefly_down_waits_for_it(
    tmp_path: Path, database: str, host: Host
) -> None:
    """The host missed its heartbeats: a request for its image queues (it is not refused as
    matching no image) and is granted and booted once the host reports again."""
    s = Scheduler(
        tmp_path, {}, admin_token=ADMIN, join_token=JOIN, host_timeout=1.0, database=database
    )
    try:
        token = "h" * 20
        reg = {"api": API_VERSION, "id": "h1", "url": host.url, "token": token}
        s.pool.register(HostRegistration.from_dict({**reg, "info": HOST_INFO}))
        time.sleep(1.3)
        alice = User("alice", admin=False)
        req = EnvRequest.from_dict({"name": "later", "os_prefix": "debian-12:amd64", "cpus": 1})
        s.submit_env(req, alice)
        assert s.pool.row("h1")["state"] == "down"
        assert s.show_env("later", alice, vms=False)["state"] == "queued"
        assert host.created == []
        s.pool.heartbeat(Heartbeat("h1", info=HOST_INFO), token)
        s.dispatch()
        deadline = time.monotonic() + 30
        while s.show_env("later", alice, vms=False)["state"] != "ready":
            assert time.monotonic() < deadline, s.show_env("later", alice, vms=False)
            time.sleep(0.05)
        assert len(host.created) == 1
        s.delete_env("later", alice)
        assert not host.alive
    finally:
        s.close()


def test_a_database_url_is_shown_without_its_password() -> None:
    assert mask_url("postgresql://tt:s3cret@db1:5433/ttci?sslmode=require") == (
        "postgresql://tt:***@db1:5433/ttci?sslmode=require"
    )
    assert "s3cret" not in mask_url("postgresql://tt@db1/ttci?password=s3cret&sslmode=require")
    assert mask_url("postgresql://tt@db1/ttci") == "postgresql://tt@db1/ttci"


def test_a_state_file_of_the_previous_release_keeps_working(tmp_path: Path) -> None:
    """tests/data/scheduler-0.1.db was made by the release before the database layer (its
    sqlite-utils schema and migrations, a host, a user, a ready ENV with its VM and job, a
    quota): the new layer migrates it once and serves every row."""
    shutil.copy(DATA / "scheduler-0.1.db", tmp_path / "scheduler.db")
    s = Scheduler(tmp_path, {}, admin_token=ADMIN, host_timeout=3600)
    try:
        assert s.store.applied()[-2:] == ["0010_user_service", "0011_replicas"]
        alice = s.users.resolve("ttu_old-alice-token")
        assert alice is not None and alice.name == "alice"
        env = s.show_env("old-env", alice)
        assert env["state"] == "ready" and [v["name"] for v in env["vms"]] == ["vm-0"]
        assert [h["id"] for h in s.hosts()] == ["h1"]
        assert history.recent(s.store)[0]["env"] == "old-env"
        assert qs.load_quotas(s.store).users["alice"].vms == 5
        with pytest.raises(TTError, match="could not be deleted"):  # its host is gone
            s.delete_env("old-env", alice)
        assert s.show_env("old-env", alice)["state"] == "failed"  # left for the reaper
    finally:
        s.close()
    again = Scheduler(tmp_path, {}, admin_token=ADMIN, host_timeout=3600)  # migrated once
    try:
        assert again.store.applied().count("0011_replicas") == 1
    finally:
        again.close()
