"""Prometheus metrics of the scheduler (prometheus-client).

The scheduler's metrics are read from its SQLite state at scrape time (VMs and ENVs by state,
host capacity and use, jobs and their results from the job history, the admission queue and
the quotas), so they survive a restart and need no hooks in the request paths. What blocks each
waiting request is the dispatcher's last decision, asked of the scheduler (`waiting`).

Both `/metrics` endpoints are open, like node_exporter's: they hold counts, sizes, host ids and
the names of users and projects that have quotas or VMs, never a token, an ENV name or a
command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
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

from ttci.infra.metrics_common import RESOURCE_UNITS, VM_STATES, BuildInfo, by_state
from ttci.infra.sql import SqlStore
from ttci.infra.sql_leases import Leases
from ttci.scheduler import admission_store as qs
from ttci.scheduler.cache_metrics import cache_metrics
from ttci.scheduler.hosts import stored_report
from ttci.scheduler.warm_metrics import warm_metrics
from ttci.wire.envs import ORIGIN_KINDS
from ttci.wire.queue import BLOCKERS

__all__ = [
    "ENV_STATES",
    "START_BUCKETS",
    "UNDECIDED",
    "WAIT_BUCKETS",
    "LeaseCollector",
    "SchedulerCollector",
    "Waiting",
    "scheduler_registry",
]

ENV_STATES = ("queued", "creating", "ready", "deleting", "failed")
START_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
UNDECIDED = "undecided"  # queued, not yet looked at by the dispatcher (just after a restart)
# What blocks each waiting request: ENV name -> capacity, quota, no_host or impossible.
Waiting = Callable[[], Mapping[str, str]]


class SchedulerCollector(Collector):
    """Everything the scheduler knows, read from its state database at scrape time."""

    def __init__(self, store: SqlStore, waiting: Waiting | None = None) -> None:
        self.store = store
        self.waiting: Waiting = waiting or (lambda: {})

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
        yield from self._queue()
        yield from self._quotas()
        if self.store.db.table("jobs").exists():
            yield from self._jobs()
            yield self._waits()

    def _hosts(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ttci_host_up", "1 if the host answers", labels=["host"])
        drained = GaugeMetricFamily(
            "ttci_host_drained", "1 if the host takes no new VMs", labels=["host"]
        )
        texts = (("capacity", "What a host hands out"), ("used", "What a host handed out"))
        fams = {
            (what, suffix): GaugeMetricFamily(
                f"ttci_host_{what}_{suffix}",
                f"{text} ({suffix.replace('_', ' ')})",
                labels=["host"],
            )
            for what, text in texts
            for _, suffix, _ in RESOURCE_UNITS
        }
        with self.store.lock:
            rows = [dict(r) for r in self.store.db.table("hosts").rows]
        reports = []
        for row in rows:
            hid = row["id"]
            up.add_metric([hid], 1 if row.get("state") == "up" else 0)
            drained.add_metric([hid], 1 if row.get("drained") else 0)
            info = stored_report(row)  # checked: a malformed report counts as none
            reports.append((hid, info))
            for what, report in (("capacity", "total"), ("used", "used")):
                for key, suffix, factor in RESOURCE_UNITS:
                    value = float(info.get(report, {}).get(key, 0)) * factor
                    fams[what, suffix].add_metric([hid], value)
        yield from (up, drained, *fams.values())
        yield from warm_metrics(reports)
        yield from cache_metrics(reports)

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
        cases = ", ".join(f"sum(case when ready_s <= {b} then 1 else 0 end)" for b in START_BUCKETS)
        for kind, n, total, *counts in self._query(
            f"select kind, count(*), sum(ready_s), {cases} from jobs group by kind"  # noqa: S608
        ):
            buckets = [(str(b), c or 0) for b, c in zip(START_BUCKETS, counts, strict=True)]
            hist.add_metric([kind], [*buckets, ("+Inf", n)], total or 0.0)
        yield hist

    def _queue(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "ttci_queue_requests",
            "ENV requests waiting in the admission queue, by origin kind and what blocks them"
            f" ({UNDECIDED}: not yet looked at)",
            labels=["kind", "reason"],
        )
        oldest = GaugeMetricFamily(
            "ttci_queue_oldest_wait_seconds",
            "How long the longest-waiting request of each origin kind has waited (0: none waits)",
            labels=["kind"],
        )
        counts = {(k, r): 0 for k in ORIGIN_KINDS for r in BLOCKERS}
        ages = dict.fromkeys(ORIGIN_KINDS, 0.0)
        blocked, now = self.waiting(), time.time()
        for req in qs.load_queue(self.store):
            key = (req.kind, blocked.get(req.id, UNDECIDED))
            counts[key] = counts.get(key, 0) + 1
            ages[req.kind] = max(ages.get(req.kind, 0.0), now - req.enqueued_at)
        for (kind, reason), n in sorted(counts.items()):
            depth.add_metric([kind, reason], n)
        for kind, age in sorted(ages.items()):
            oldest.add_metric([kind], max(0.0, age))
        yield from (depth, oldest)

    def _quotas(self) -> Iterator[Metric]:
        """Use and caps per user and project: every one with a cap set or VMs in use."""
        quotas, use = qs.load_quotas(self.store), qs.in_use(self.store)
        fams = {
            key: GaugeMetricFamily(f"ttci_quota_{key}", text, labels=["scope", "name"])
            for key, text in (
                ("used_vms", "VMs a user or project has now (being created included)"),
                ("used_cpus", "vCPUs a user or project has now (being created included)"),
                ("limit_vms", "The cap on a user's or project's concurrent VMs (absent: none)"),
                ("limit_cpus", "The cap on a user's or project's concurrent vCPUs (absent: none)"),
            )
        }
        for scope, caps, used in (
            ("user", quotas.users, use.users),
            ("project", quotas.projects, use.projects),
        ):
            for name in sorted(set(caps) | set(used)):
                u, q = used.get(name), caps.get(name)
                fams["used_vms"].add_metric([scope, name], u.vms if u else 0)
                fams["used_cpus"].add_metric([scope, name], u.cpus if u else 0.0)
                if q is not None and q.vms is not None:
                    fams["limit_vms"].add_metric([scope, name], q.vms)
                if q is not None and q.cpus is not None:
                    fams["limit_cpus"].add_metric([scope, name], q.cpus)
        yield from fams.values()

    def _waits(self) -> Metric:
        hist = HistogramMetricFamily(
            "ttci_queue_wait_seconds",
            "How long each ENV that became ready waited in the admission queue, by origin",
            labels=["kind"],
        )
        cases = ", ".join(f"sum(case when wait_s <= {b} then 1 else 0 end)" for b in WAIT_BUCKETS)
        for kind, n, total, *counts in self._query(
            f"select kind, count(*), sum(wait_s), {cases} from jobs group by kind"  # noqa: S608
        ):
            buckets = [(str(b), c or 0) for b, c in zip(WAIT_BUCKETS, counts, strict=True)]
            hist.add_metric([kind], [*buckets, ("+Inf", n)], total or 0.0)
        return hist


class LeaseCollector(Collector):
    """ttci_lease_held{name}: 1 on the replica that runs that background loop now."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "ttci_lease_held",
            "1 if this scheduler replica holds the lease (runs that background loop)",
            labels=["name"],
        )
        for name in self.leases.names:
            held.add_metric([name], 1 if self.leases.held(name) else 0)
        yield held


def scheduler_registry(
    store: SqlStore, waiting: Waiting | None = None, leases: Leases | None = None
) -> CollectorRegistry:
    """The scheduler's metrics; `waiting` gives what blocks each queued ENV (the dispatcher's
    last decision); without it every queued request counts as undecided."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SchedulerCollector(store, waiting))
    if leases is not None:
        reg.register(LeaseCollector(leases))
    reg.register(BuildInfo("tt-scheduler"))
    return reg
