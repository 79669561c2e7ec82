"""Scheduler benchmark: a 10,000-VM ENV over 100 registered hosts, API reads under load, queue
dispatch and lease failover, on SQLite and on PostgreSQL with 1 and 3 replicas.

    python -m bench.scheduler [--database sqlite|postgresql] [--replicas N] [--vms 10000]
                              [--hosts 100] [--clients 50] [--json out.json]

Without --database/--replicas it compares, in one run: SQLite with 1 scheduler (the baseline),
PostgreSQL with 1, and PostgreSQL with 3 replicas (a throw-away cluster like the tests',
tests/pgcluster.py: Debian's postgresql package, nothing assumed running). Real tt-scheduler
processes; no VMs are booted: the hosts' URL is one loopback stand-in that accepts VM creation
and deletion at once, so what is measured is the scheduler itself. Per configuration:
- placing the ENV (`POST /v1/envs?dry_run=1`), creating it for real through the stand-in (one
  hostd call per VM), listing it (paged and NDJSON), deleting it;
- API read latency (p50/p99) with N concurrent keep-alive clients spread over the replicas
  (status, hosts, ENV list, a VM page) while the big ENV exists;
- queue dispatch: from a DELETE that frees capacity to the waiting request's POST answered
  ready (the waiter on another replica than the DELETE when there are several);
- failover (replicas >= 2): SIGKILL the replica holding the loops' leases, until another
  holds them all (goal <= 5 s).
The SQLite run also measures TT's ceiling (an ENV of 400 VMs) for the per-VM ratios.
Targets: placing and listing <= 1 s each; read p99 <= 100 ms with 50 clients (best config).
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository instead of bench/ itself: bench/queue.py would shadow the standard library's.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from bench.common import free_port, print_table, write_json
from bench.sched_cloud import (
    cloud,
    dispatch_latency,
    failover,
    measure_env,
    read_load,
    register_hosts,
    stand_in_hostd,
    timed,
)

STEPS = (
    ("place_s", "place (dry run)"),
    ("create_s", "create (1 hostd call per VM)"),
    ("list_paged_s", "list all VMs, paged"),
    ("list_stream_s", "list all VMs, NDJSON stream"),
    ("delete_s", "delete"),
)


@contextlib.contextmanager
def _postgres(needed: bool) -> Iterator[Any]:
    if not needed:
        yield None
        return
    from tests.pgcluster import pg_cluster

    with pg_cluster() as pg:
        yield pg


def run_config(
    args: argparse.Namespace, pg: Any, database: str, replicas: int, hostd_port: int
) -> dict[str, Any]:
    label = f"{database}/{replicas}"
    print(f"-- {label}", flush=True)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg.database()) if database == "postgresql" else ""
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tt-bench-sched-")))
        c = stack.enter_context(cloud(tmp, url, replicas))
        out: dict[str, Any] = {"config": label, "database": database, "replicas": replicas}
        out["register_s"] = register_hosts(c, args.hosts, hostd_port)
        api = c.api(0)
        if database == "sqlite":
            out["baseline"] = measure_env(api, "tt-ceiling", 400)
        out["big"] = measure_env(api, "big", args.vms, keep=True)
        out["reads"] = read_load(c, args.clients, args.requests, "big")
        out["big"]["delete_s"] = measure_delete(api)
        out["dispatch"] = dispatch_latency(c, args.rounds)
        if replicas >= 2:
            out["failover"] = failover(c)
    return out


def measure_delete(api: Any) -> float:
    s, _ = timed(lambda: api.call("DELETE", "/v1/envs/big"))
    return float(s)


def _tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    base = results[0]
    if "baseline" in base:
        rows = []
        big, small = base["big"], base["baseline"]
        for key, label in STEPS:
            per_big = big[key] / big["vms"] * 1e6
            per_base = small[key] / small["vms"] * 1e6
            rows.append(
                [
                    label,
                    f"{small[key]:.3f} s",
                    f"{big[key]:.3f} s",
                    f"{per_base:.0f} / {per_big:.0f} us",
                    f"{per_big / per_base:.2f}x",
                ]
            )
        print_table(
            f"{base['config']}: {args.vms} VMs over {args.hosts} hosts "
            f"(registering them took {base['register_s']:.2f} s)",
            ["step", "400 VMs (TT's ceiling)", f"{args.vms} VMs", "per VM 400 / big", "ratio"],
            rows,
        )
    configs = [r["config"] for r in results]
    rows = [[label, *(f"{r['big'][key]:.3f} s" for r in results)] for key, label in STEPS]
    reads = [r["reads"] for r in results]
    rows += [
        [f"reads p50 ({args.clients} clients)", *(f"{x['p50_ms']:.1f} ms" for x in reads)],
        [f"reads p99 ({args.clients} clients)", *(f"{x['p99_ms']:.1f} ms" for x in reads)],
        ["reads per second", *(f"{x['rps']:.0f}" for x in reads)],
        ["queue dispatch p50", *(f"{r['dispatch']['p50_ms']:.0f} ms" for r in results)],
        ["queue dispatch max", *(f"{r['dispatch']['max_ms']:.0f} ms" for r in results)],
        [
            "lease failover (SIGKILL)",
            *(f"{r['failover']['takeover_s']:.2f} s" if "failover" in r else "-" for r in results),
        ],
    ]
    p99 = [x["p99_ms"] for x in reads]
    ratio = [f"{reads[0]['p99_ms'] / x:.2f}x" for x in p99]
    rows.append([f"reads p99 vs {configs[0]}", *ratio])
    print_table(
        f"{args.vms}-VM ENV, {args.hosts} hosts, per database/replicas (targets: place and list"
        " <= 1 s, reads p99 <= 100 ms, failover <= 5 s)",
        ["", *configs],
        rows,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database", choices=("sqlite", "postgresql"), help="only this backend")
    p.add_argument("--replicas", type=int, help="scheduler processes on the database")
    p.add_argument("--vms", type=int, default=10_000, help="VMs in the big ENV")
    p.add_argument("--hosts", type=int, default=100, help="registered host records")
    p.add_argument("--clients", type=int, default=50, help="concurrent API clients")
    p.add_argument("--requests", type=int, default=40, help="reads per client")
    p.add_argument("--rounds", type=int, default=10, help="queue dispatch measurements")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.database is None and args.replicas is None:
        configs = [("sqlite", 1), ("postgresql", 1), ("postgresql", 3)]
    else:
        database = args.database or "postgresql"
        replicas = args.replicas or 1
        if database == "sqlite" and replicas != 1:
            raise SystemExit("SQLite serves one scheduler process: --replicas 1")
        configs = [(database, replicas)]
    hostd_port = free_port()
    stand_in_hostd(hostd_port)
    with _postgres(any(db == "postgresql" for db, _ in configs)) as pg:
        results = [run_config(args, pg, db, n, hostd_port) for db, n in configs]
    _tables(args, results)
    write_json(args.json, {"vms": args.vms, "hosts": args.hosts, "results": results})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TT_LOG_LEVEL", "WARNING")
    sys.exit(main())
