"""Scheduler benchmark: a 10,000-VM ENV over 100 registered hosts, and API reads under load.

    python bench/scheduler.py [--vms 10000] [--hosts 100] [--clients 50] [--json out.json]

A real tt-scheduler (its own process, SQLite state) with 100 host records registered through
the real join API. No VMs are booted: the hosts' URL is one loopback stand-in that accepts VM
creation and deletion at once, so what is measured is the scheduler itself. Measured:
- placing the ENV (`POST /v1/envs?dry_run=1`: validation + placement, nothing made);
- creating it for real through the stand-in (every VM recorded, one hostd call each);
- listing it: every VM through the paged API and through the NDJSON stream;
- API read latency (p50/p99) with N concurrent clients (status, hosts, ENV list, a VM page).
Baseline in the same run: TT's ceiling, an ENV of 400 VMs (TT broke there, over UDP), so the
ratios show how per-VM cost holds at 25x the size. Targets: placing and listing <= 1 s each;
read p99 <= 100 ms with 50 clients.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import waitress
from flask import Flask, Response, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, print_table, write_json
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
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_env(api: Api, name: str, vms: int) -> dict[str, float]:
    body = {"name": name, "os_prefix": "debian-12:amd64", "dup_each": vms, "memory_mib": 256}
    place_s, plan = timed(lambda: api.call("POST", "/v1/envs?dry_run=1", json=body).json())
    assert plan["vm_count"] == vms, plan
    create_s, _ = timed(lambda: api.call("POST", "/v1/envs", json=body))

    def paged() -> int:
        n, offset = 0, 0
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
    delete_s, _ = timed(lambda: api.call("DELETE", f"/v1/envs/{name}"))
    return {
        "vms": vms,
        "place_s": place_s,
        "create_s": create_s,
        "list_paged_s": page_s,
        "list_stream_s": stream_s,
        "delete_s": delete_s,
    }


def read_load(api: Api, clients: int, per_client: int, env: str) -> dict[str, float]:
    paths = ["/v1/status", "/v1/hosts", "/v1/envs", f"/v1/envs/{env}/vms?limit=100"]
    latencies: list[float] = []
    lock = threading.Lock()

    host, port = api.base.removeprefix("http://").split(":")
    headers = {"Authorization": f"Bearer {api.token}"}

    def one(i: int) -> None:
        # A plain keep-alive connection per client: the load generator shares the 2 cores with
        # the scheduler, so it should cost as little CPU as possible.
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        mine = []
        for k in range(per_client):
            t0 = time.perf_counter()
            conn.request("GET", paths[(i + k) % len(paths)], headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"GET {paths[(i + k) % len(paths)]}: {r.status}")
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
        "rps": len(latencies) / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=10_000, help="VMs in the big ENV")
    p.add_argument("--hosts", type=int, default=100, help="registered host records")
    p.add_argument("--clients", type=int, default=50, help="concurrent API clients")
    p.add_argument("--requests", type=int, default=40, help="reads per client")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    admin, join = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    hostd_port, port = free_port(), free_port()
    stand_in_hostd(hostd_port)
    with tempfile.TemporaryDirectory(prefix="tt-bench-sched-") as tmp:
        state = Path(tmp)
        argv = [
            *python_main("ttci.scheduler.web.serve"),
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
            "--host-timeout",
            "3600",
        ]
        env = {**BASE_ENV, "TT_ADMIN_TOKEN": admin, "TT_JOIN_TOKEN": join}
        sched = _spawn(argv, env, state / "scheduler.log", "tt-scheduler")
        try:
            api = Api(f"http://127.0.0.1:{port}", admin)
            joiner = Api(f"http://127.0.0.1:{port}", join)
            reg_s, _ = timed(
                lambda: [
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
                    for i in range(args.hosts)
                ]
            )
            baseline = measure_env(api, "tt-ceiling", 400)
            big = measure_env(api, "big", args.vms)
            # Reads while a big ENV exists.
            body = {"name": "big", "os_prefix": "debian-12:amd64", "dup_each": args.vms}
            api.call("POST", "/v1/envs", json={**body, "memory_mib": 256})
            load = read_load(api, args.clients, args.requests, "big")
            api.call("DELETE", "/v1/envs/big")
        finally:
            stop(sched, grace=STOP_GRACE_S)
    rows = []
    for key, label in (
        ("place_s", "place (dry run)"),
        ("create_s", "create (1 hostd call per VM)"),
        ("list_paged_s", "list all VMs, paged"),
        ("list_stream_s", "list all VMs, NDJSON stream"),
        ("delete_s", "delete"),
    ):
        per_big = big[key] / big["vms"] * 1e6
        per_base = baseline[key] / baseline["vms"] * 1e6
        rows.append(
            [
                label,
                f"{baseline[key]:.3f} s",
                f"{big[key]:.3f} s",
                f"{per_base:.0f} / {per_big:.0f} us",
                f"{per_big / per_base:.2f}x",
            ]
        )
    print_table(
        f"{args.vms} VMs over {args.hosts} registered hosts (registering them took {reg_s:.2f} s)",
        ["step", "400 VMs (TT's ceiling)", f"{args.vms} VMs", "per VM 400 / big", "per-VM ratio"],
        rows,
    )
    print_table(
        f"API reads, {load['clients']} concurrent clients ({load['requests']} requests)",
        ["p50", "p99", "requests/s", "target p99"],
        [[f"{load['p50_ms']:.1f} ms", f"{load['p99_ms']:.1f} ms", f"{load['rps']:.0f}", "100 ms"]],
    )
    write_json(
        args.json,
        {"hosts": args.hosts, "register_s": reg_s, "baseline": baseline, "big": big, "reads": load},
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TT_LOG_LEVEL", "WARNING")
    sys.exit(main())
