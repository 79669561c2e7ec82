"""Prometheus metrics of the scheduler and of each hostd (prometheus-client).

The scheduler's metrics are read from its SQLite state at scrape time (VMs and ENVs by state,
host capacity and use, jobs and their results from the job history), so they survive a restart
and need no hooks in the request paths. hostd counts boots and commands in-process and reads VMs
and capacity from its VM manager at scrape time.

Both `/metrics` endpoints are open, like node_exporter's: they hold counts, sizes and host ids,
never a token, an ENV name or a command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ttci.db import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
VM_STATES = ("creating", "running", "lost", "failed")
ENV_STATES = ("creating", "ready", "deleting", "failed")
RESOURCES = (("cpus", "cpus"), ("memory_mib", "memory_mib"), ("disk_gib", "disk_gib"))
START_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BOOT_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
EXEC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def _by_state(rows: list[tuple[str, int]], known: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(known, 0)
    for state, n in rows:
        counts[state] = counts.get(state, 0) + n
    return counts


class SchedulerCollector(Collector):
    """Everything the scheduler knows, read from its state database at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _query(self, sql: str, args: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.store.lock:
            return list(self.store.db.execute(sql, args or []).fetchall())

    def collect(self) -> Iterator[Metric]:
        vms = GaugeMetricFamily(
            "ttci_vms", "VMs in the scheduler's state, by state", labels=["state"]
        )
        for state, n in _by_state(
            self._query("select state, count(*) from vms group by state"), VM_STATES
        ).items():
            vms.add_metric([state], n)
        yield vms
        envs = GaugeMetricFamily("ttci_envs", "ENVs by state", labels=["state"])
        for state, n in _by_state(
            self._query("select state, count(*) from envs group by state"), ENV_STATES
        ).items():
            envs.add_metric([state], n)
        yield envs
        yield from self._hosts()
        if self._query("select name from sqlite_master where name = 'jobs'"):
            yield from self._jobs()

    def _hosts(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ttci_host_up", "1 if the host answers", labels=["host"])
        drained = GaugeMetricFamily(
            "ttci_host_drained", "1 if the host takes no new VMs", labels=["host"]
        )
        cap = GaugeMetricFamily(
            "ttci_host_capacity", "What a host hands out", labels=["host", "resource"]
        )
        used = GaugeMetricFamily(
            "ttci_host_used", "What a host has handed out", labels=["host", "resource"]
        )
        with self.store.lock:
            rows = [dict(r) for r in self.store.db.table("hosts").rows]
        for row in rows:
            hid = row["id"]
            up.add_metric([hid], 1 if row.get("state") == "up" else 0)
            drained.add_metric([hid], 1 if row.get("drained") else 0)
            try:
                info = json.loads(row.get("info") or "{}")
            except ValueError:
                info = {}
            for key, label in RESOURCES:
                cap.add_metric([hid, label], float(info.get("total", {}).get(key, 0)))
                used.add_metric([hid, label], float(info.get("used", {}).get(key, 0)))
        yield from (up, drained, cap, used)

    def _jobs(self) -> Iterator[Metric]:
        started = CounterMetricFamily(
            "ttci_jobs_started", "Jobs (ENVs) that became ready, by origin", labels=["kind"]
        )
        for kind, n in self._query("select kind, count(*) from jobs group by kind"):
            started.add_metric([kind], n)
        yield started
        results = CounterMetricFamily(
            "ttci_job_results",
            "Job outcomes reported by the CI plugins and `tt job run` (executor and webhook"
            " outcomes), by origin and result",
            labels=["kind", "result"],
        )
        for kind, result, n in self._query(
            "select kind, result, count(*) from jobs where result != '' group by kind, result"
        ):
            results.add_metric([kind, result], n)
        yield results
        hist = HistogramMetricFamily(
            "ttci_job_start_seconds",
            "From ENV request to every VM ready (job start latency)",
            labels=["kind"],
        )
        cases = ", ".join(f"sum(ready_s <= {b})" for b in START_BUCKETS)
        for kind, n, total, *counts in self._query(
            f"select kind, count(*), sum(ready_s), {cases} from jobs group by kind"  # noqa: S608
        ):
            buckets = [(str(b), c or 0) for b, c in zip(START_BUCKETS, counts, strict=True)]
            hist.add_metric([kind], [*buckets, ("+Inf", n)], total or 0.0)
        yield hist


def scheduler_registry(store: Store) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SchedulerCollector(store))
    return reg


class _Snapshot(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        vms = GaugeMetricFamily("ttci_hostd_vms", "VMs on this host, by state", labels=["state"])
        for state, n in _by_state(list(snap["vms"].items()), VM_STATES).items():
            vms.add_metric([state], n)
        yield vms
        for name, what in (("capacity", "total"), ("used", "used")):
            g = GaugeMetricFamily(
                f"ttci_hostd_{name}", f"Resources this host has ({what})", labels=["resource"]
            )
            for key, label in RESOURCES:
                g.add_metric([label], float(snap[what].get(key, 0)))
            yield g


class HostMetrics:
    """hostd's metrics: boots and commands counted as they happen, VMs and capacity on scrape.

    snapshot() returns {"vms": {state: count}, "total": {...}, "used": {...}}.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.boots = Counter(
            "ttci_hostd_vm_boots",
            "VM creations, by result",
            ["result"],
            registry=self.registry,
        )
        self.boot_seconds = Histogram(
            "ttci_hostd_vm_boot_seconds",
            "From create request to the agent's first answer",
            buckets=BOOT_BUCKETS,
            registry=self.registry,
        )
        self.execs = Counter(
            "ttci_hostd_execs",
            "Commands run in VMs, by outcome (ok, failed, timed_out, killed, error, cancelled)",
            ["outcome"],
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "ttci_hostd_exec_seconds",
            "Command duration from start to exit",
            buckets=EXEC_BUCKETS,
            registry=self.registry,
        )
        for r in ("ok", "failed"):
            self.boots.labels(r)
        for o in ("ok", "failed", "timed_out", "killed", "error", "cancelled"):
            self.execs.labels(o)
        self.registry.register(_Snapshot(snapshot))

    def booted(self, seconds: float) -> None:
        self.boots.labels("ok").inc()
        self.boot_seconds.observe(seconds)

    def boot_failed(self) -> None:
        self.boots.labels("failed").inc()

    def exec_done(self, event: dict[str, Any], seconds: float) -> None:
        """Count a finished command from its final event (exit or error)."""
        if event.get("event") == "error":
            outcome = "error"
        elif event.get("cancelled"):
            outcome = "cancelled"
        elif event.get("timed_out"):
            outcome = "timed_out"
        elif event.get("signal"):
            outcome = "killed"
        else:
            outcome = "ok" if event.get("code") == 0 else "failed"
        self.execs.labels(outcome).inc()
        self.exec_seconds.observe(seconds)

    def count_boot(self, create: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a VM creation, counting it and timing its boot (boot_s of the row it returns)."""
        try:
            row = create()
        except Exception:
            self.boot_failed()
            raise
        self.booted(float(row.get("boot_s") or 0.0))
        return row

    def timed_exec(self, events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass a command's event stream through, counting it when it ends.

        A stream the client abandons before the end counts as cancelled.
        """
        t0, final = time.monotonic(), None
        try:
            for ev in events:
                if ev.get("event") in ("exit", "error"):
                    final = ev
                yield ev
        finally:
            self.exec_done(final or {"event": "exit", "cancelled": True}, time.monotonic() - t0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def hostd_snapshot(mgr: Any) -> dict[str, Any]:
    """VMs by state and capacity of a hostd VMManager (for HostMetrics)."""
    counts: dict[str, int] = {}
    for row in mgr.all():
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"vms": counts, "total": mgr.cfg.total.to_dict(), "used": mgr.used().to_dict()}
