"""The scheduler benchmark's cloud: a stand-in hostd, real tt-scheduler replicas on one database,
and the measurements (bench/scheduler.py prints them)."""

from __future__ import annotations

import contextlib
import http.client
import secrets
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import waitress
from flask import Flask, Response, jsonify, request

from bench.common import free_port
from tests.pgcluster import leases_held
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.wire.api import API_VERSION

IMAGES = [
    "qemu:debian-12:amd64",
    "qemu:debian-12:arm64",
    "qemu:debian-12:armhf",
    "qemu:debian-12:i386",
    "qemu:debian-12:ppc64el",
    "qemu:debian-12:s390x",
    "qemu:debian-13:amd64",
    "qemu:debian-13:arm64",
    "qemu:debian-14:riscv64",
]
HOST_INFO = {
    "total": {"cpus": 2000, "memory_mib": 4_000_000, "disk_gib": 100_000},
    "free": {"cpus": 2000, "memory_mib": 4_000_000, "disk_gib": 100_000},
    "images": [{"name": n, "disk_gib": 4} for n in IMAGES],
    "accel": "tcg",
    "machine": "x86_64",
    "api": API_VERSION,
}
LOOPS = ("dispatcher", "hosts", "reaper")


def stand_in_hostd(port: int) -> None:
    """Accepts what the scheduler asks of a hostd, at once (no VM is booted)."""
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

    @app.delete("/v1/vms/<vm_id>")
    def delete(vm_id: str) -> tuple[str, int]:
        return "", 204

    server = waitress.create_server(
        app, host="127.0.0.1", port=port, threads=16, connection_limit=4000, channel_timeout=30
    )
    threading.Thread(target=server.run, daemon=True).start()


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.local = threading.local()
        self.token = token

    def session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
            s.headers["Authorization"] = f"Bearer {self.token}"
        return s

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        r = self.session().request(method, self.base + path, timeout=600, **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {self.base}{path}: {r.status_code} {r.text[:300]}")
        return r

    def as_user(self, token: str) -> Api:
        return Api(self.base, token)


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]

    def held(self) -> set[str]:
        return leases_held(self.url)


@dataclass
class Cloud:
    replicas: list[Replica]
    admin: str
    join: str

    def api(self, i: int = 0, token: str = "") -> Api:
        return Api(self.replicas[i % len(self.replicas)].url, token or self.admin)


@contextlib.contextmanager
def cloud(state: Path, database: str, replicas: int) -> Iterator[Cloud]:
    """`replicas` tt-scheduler processes on one database ("" = SQLite in state), started
    together; stopped afterwards."""
    admin, join = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**BASE_ENV, "TT_ADMIN_TOKEN": admin, "TT_JOIN_TOKEN": join, "TT_LOG_LEVEL": "WARNING"}
    started: list[Replica] = []

    def one(i: int) -> None:
        port = free_port()
        argv = [
            *python_main("ttci.scheduler.web.serve"),
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state / f"r{i}"),
            "--host-timeout",
            "3600",
            *(["--database", database] if database else []),
        ]
        (state / f"r{i}").mkdir(parents=True, exist_ok=True)
        proc = _spawn(argv, env, state / f"r{i}" / "scheduler.log", "tt-scheduler")
        started.append(Replica(f"http://127.0.0.1:{port}", proc))

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(started) != replicas:
            raise SystemExit(f"a replica did not start; see the logs under {state}")
        yield Cloud(started, admin, join)
    finally:
        for r in started:
            if r.proc.poll() is None:
                stop(r.proc, grace=STOP_GRACE_S)


def register_hosts(c: Cloud, hosts: int, hostd_port: int) -> float:
    joiner = c.api(0, c.join)
    t0 = time.perf_counter()
    for i in range(hosts):
        joiner.call(
            "POST",
            "/v1/hosts/register",
            json={
                "id": f"host-{i:03d}",
                "url": f"http://127.0.0.1:{hostd_port}",
                "api": API_VERSION,
                "token": secrets.token_urlsafe(16),
                "info": HOST_INFO,
            },
        )
    return time.perf_counter() - t0


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_env(api: Api, name: str, vms: int, keep: bool = False) -> dict[str, float]:
    """Place (dry run), create, list (paged, streamed) and delete an ENV of `vms` VMs (keep:
    leave it, for the reads that follow)."""
    body = {"name": name, "os_prefix": "debian-12:amd64", "dup_each": vms, "memory_mib": 256}
    place_s, plan = timed(lambda: api.call("POST", "/v1/envs?dry_run=1", json=body).json())
    assert plan["vm_count"] == vms, plan
    create_s, _ = timed(lambda: api.call("POST", "/v1/envs", json=body))

    def paged() -> int:
        n, offset = 0, 0  # type: tuple[int, int | None]
        while offset is not None:
            page = api.call("GET", f"/v1/envs/{name}/vms?offset={offset}&limit=5000").json()
            n += len(page["vms"])
            offset = page["next_offset"]
        return n

    page_s, n_paged = timed(paged)
    stream_s, n_stream = timed(
        lambda: sum(
            1 for line in api.call("GET", f"/v1/envs/{name}/vms?stream=1").iter_lines() if line
        )
    )
    assert n_paged == n_stream == vms, (n_paged, n_stream)
    out = {
        "vms": vms,
        "place_s": place_s,
        "create_s": create_s,
        "list_paged_s": page_s,
        "list_stream_s": stream_s,
    }
    if not keep:
        out["delete_s"], _ = timed(lambda: api.call("DELETE", f"/v1/envs/{name}"))
    return out


def read_load(
    c: Cloud, clients: int, per_client: int, env: str, warmup: int = 5
) -> dict[str, float]:
    """p50/p99 of API reads by `clients` concurrent keep-alive clients, spread over the
    replicas (client i talks to replica i mod N); each client's first `warmup` reads (new
    connections, connection pools filling) are not counted."""
    paths = ["/v1/status", "/v1/hosts", "/v1/envs", f"/v1/envs/{env}/vms?limit=100"]
    latencies: list[float] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {c.admin}"}

    def one(i: int) -> None:
        # A plain keep-alive connection per client: the load generator shares the 2 cores with
        # the scheduler, so it should cost as little CPU as possible.
        host, port = c.replicas[i % len(c.replicas)].url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        mine = []
        for k in range(warmup + per_client):
            t0 = time.perf_counter()
            conn.request("GET", paths[(i + k) % len(paths)], headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"GET {paths[(i + k) % len(paths)]}: {r.status}")
            if k >= warmup:
                mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "rps": clients * (warmup + per_client) / wall,  # every read answered, over the wall time
    }


def dispatch_latency(c: Cloud, rounds: int) -> dict[str, float]:
    """Capacity freed -> the waiting request ready: a user capped at one VM holds one ENV while
    the next one waits (submitted to another replica than the DELETE goes to, when there are
    several); from the DELETE answered to the waiting POST answered (granted, booted on the
    stand-in, the client told)."""
    admin = c.api(0)
    token = admin.call("POST", "/v1/users", json={"name": "qbench"}).json()["token"]
    admin.call("PUT", "/v1/quotas", json={"scope": "user", "name": "qbench", "vms": 1})
    body = {"os_prefix": "debian-12:amd64", "memory_mib": 256}
    c.api(0, token).call("POST", "/v1/envs", json={**body, "name": "q-0"})
    took = []
    for i in range(1, rounds + 1):
        waiter = c.api(i, token)
        done: dict[str, float] = {}

        def submit(api: Api = waiter, name: str = f"q-{i}", out: dict[str, float] = done) -> None:
            api.call("POST", "/v1/envs", json={**body, "name": name})
            out["ready"] = time.perf_counter()

        t = threading.Thread(target=submit)
        t.start()
        while True:
            r = admin.session().get(f"{admin.base}/v1/envs/q-{i}", timeout=10)
            if r.status_code == 200 and r.json()["state"] == "queued":
                break
            time.sleep(0.02)
        c.api(i + 1, token).call("DELETE", f"/v1/envs/q-{i - 1}")
        freed = time.perf_counter()
        t.join(timeout=60)
        took.append(done["ready"] - freed)
    c.api(0, token).call("DELETE", f"/v1/envs/q-{rounds}")
    took.sort()
    return {
        "rounds": rounds,
        "p50_ms": 1000 * statistics.median(took),
        "max_ms": 1000 * took[-1],
    }


def failover(c: Cloud) -> dict[str, float]:
    """SIGKILL the replica holding the loops' leases; seconds until another holds them all."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        holders = [r for r in c.replicas if r.held()]
        if len(holders) == 1 and holders[0].held() == set(LOOPS):
            break
        time.sleep(0.1)
    else:
        raise SystemExit("no replica holds every lease")
    victim = holders[0]
    stop(victim.proc, grace=0)
    killed = time.perf_counter()
    others = [r for r in c.replicas if r is not victim]
    while time.perf_counter() - killed < 30:
        if any(r.held() == set(LOOPS) for r in others):
            return {"takeover_s": time.perf_counter() - killed}
        time.sleep(0.05)
    raise SystemExit("no replica took the leases over within 30 s")
