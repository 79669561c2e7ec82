"""Prometheus metrics of the scheduler (prometheus-client).

The scheduler's metrics are read from its SQLite state at scrape time (VMs and ENVs by state,
host capacity and use, jobs and their results from the job history), so they survive a restart
and need no hooks in the request paths.

Both `/metrics` endpoints are open, like node_exporter's: they hold counts, sizes and host ids,
never a token, an ENV name or a command line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ttci.infra.db import Store
from ttci.infra.metrics_common import RESOURCES, VM_STATES, by_state

__all__ = ["ENV_STATES", "START_BUCKETS", "SchedulerCollector", "scheduler_registry"]

ENV_STATES = ("creating", "ready", "deleting", "failed")
START_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


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
        for state, n in by_state(
            self._query("select state, count(*) from vms group by state"), VM_STATES
        ).items():
            vms.add_metric([state], n)
        yield vms
        envs = GaugeMetricFamily("ttci_envs", "ENVs by state", labels=["state"])
        for state, n in by_state(
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
