"""Prometheus metrics of hostd: boots and commands counted in-process; VMs and capacity read
from the VM manager at scrape time. The endpoint is open and never shows a token or command line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hostd.service.cache_api import cache_metrics
from ttci.infra.metrics_common import CONTENT_TYPE, RESOURCE_UNITS, VM_STATES, BuildInfo, by_state
from ttci.wire.commands import ExecEvent

__all__ = ["CONTENT_TYPE", "HostMetrics", "hostd_snapshot"]

BOOT_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
EXEC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class _Snapshot(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        vms = GaugeMetricFamily("ttci_hostd_vms", "VMs on this host, by state", labels=["state"])
        for state, n in by_state(list(snap["vms"].items()), VM_STATES).items():
            vms.add_metric([state], n)
        yield vms
        for name, what in (("capacity", "total"), ("used", "used")):
            for key, suffix, factor in RESOURCE_UNITS:
                yield GaugeMetricFamily(
                    f"ttci_hostd_{name}_{suffix}",
                    f"Resources this host has ({what}, {suffix.replace('_', ' ')})",
                    value=float(snap[what].get(key, 0)) * factor,
                )
        denied = CounterMetricFamily(
            "ttci_hostd_egress_denied_connections",
            "Connections an ENV's egress allow-list denied (mode audit: would have denied)",
            labels=["env", "mode"],
        )
        for env, (mode, n) in sorted(snap.get("egress", {}).items()):
            denied.add_metric([env, mode], float(n))
        yield denied
        if "warm" in snap:
            yield from _warm(snap["warm"])
        if "caches" in snap:
            yield from cache_metrics(snap["caches"])


TEMPLATE_STATES = ("building", "ready", "stale", "failed")


def _warm(warm: dict[str, Any]) -> Iterator[Metric]:
    """Snapshot templates: how many, their bytes, warm hits and misses by reason, self-tests."""
    tpl = GaugeMetricFamily(
        "ttci_hostd_templates", "Snapshot templates, by state", labels=["state"]
    )
    for state, n in by_state([(t["state"], 1) for t in warm["templates"]], TEMPLATE_STATES).items():
        tpl.add_metric([state], n)
    yield tpl
    yield GaugeMetricFamily(
        "ttci_hostd_template_bytes", "Disk the templates take", value=float(warm["bytes"])
    )
    starts = CounterMetricFamily(
        "ttci_hostd_warm_starts",
        "VM starts by kind (warm: restored from a template)",
        labels=["kind"],
    )
    starts.add_metric(["warm"], warm["hits"])
    starts.add_metric(["cold"], sum(warm["misses"].values()))
    yield starts
    misses = CounterMetricFamily(
        "ttci_hostd_warm_misses", "Cold starts, by why no template was used", labels=["reason"]
    )
    for reason, n in warm["misses"].items():
        misses.add_metric([reason], n)
    yield misses
    tests = GaugeMetricFamily(
        "ttci_hostd_restore_selftest",
        "Restore self-test per architecture, QEMU and accelerator (1 passed, 0 failed)",
        labels=["arch", "qemu", "accel"],
    )
    for t in warm["selftests"]:
        tests.add_metric([t["arch"], t["qemu"], t["accel"]], 1.0 if t["ok"] else 0.0)
    yield tests


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
        self.registry.register(BuildInfo("tt-hostd"))

    def booted(self, seconds: float) -> None:
        self.boots.labels("ok").inc()
        self.boot_seconds.observe(seconds)

    def boot_failed(self) -> None:
        self.boots.labels("failed").inc()

    def exec_done(self, event: ExecEvent | None, seconds: float) -> None:
        """Count a finished command from its final event (exit or error; None: the client
        left before the end, which cancels the command)."""
        st = event.status if event is not None else None
        if event is not None and st is None:
            outcome = "error"
        elif st is None or st.cancelled:
            outcome = "cancelled"
        elif st.timed_out:
            outcome = "timed_out"
        elif st.signal:
            outcome = "killed"
        else:
            outcome = "ok" if st.ok else "failed"
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

    def timed_exec(self, events: Iterator[ExecEvent]) -> Iterator[ExecEvent]:
        """Pass a command's event stream through, counting it when it ends.

        A stream the client abandons before the end counts as cancelled.
        """
        t0, final = time.monotonic(), None
        try:
            for ev in events:
                if ev.final:
                    final = ev
                yield ev
        finally:
            self.exec_done(final, time.monotonic() - t0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def hostd_snapshot(mgr: Any) -> dict[str, Any]:
    """VMs by state and capacity of a hostd VMManager (for HostMetrics)."""
    counts: dict[str, int] = {}
    for row in mgr.all():
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {
        "vms": counts,
        "total": mgr.cfg.total.to_dict(),
        "used": mgr.used().to_dict(),
        "egress": mgr.net.egress_counts(),
        "warm": mgr.templates.report(),
        "caches": mgr.caches.stats(),
    }
