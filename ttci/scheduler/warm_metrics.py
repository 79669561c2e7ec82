"""The scheduler's warm start metrics, from its hosts' checked reports (ttci.wire.warm): ready
snapshot templates per host and architecture, restore self-tests, and warm and cold VM starts
(cold ones by why) per host and summed over the pool."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["warm_metrics"]


def warm_metrics(reports: Iterable[tuple[str, Mapping[str, Any]]]) -> Iterator[Metric]:
    """reports: (host id, its checked report); hosts without a `warm` field are left out."""
    templates = GaugeMetricFamily(
        "ttci_host_templates",
        "Ready snapshot templates (VMs of their image and size start warm), by host and arch",
        labels=["host", "arch"],
    )
    selftest = GaugeMetricFamily(
        "ttci_host_restore_selftest",
        "Restore self-test per host, arch, QEMU and accelerator (1 passed, 0 failed: cold)",
        labels=["host", "arch", "qemu", "accel"],
    )
    starts = CounterMetricFamily(
        "ttci_host_vm_starts", "VM starts by host and kind (warm or cold)", labels=["host", "kind"]
    )
    misses = CounterMetricFamily(
        "ttci_warm_misses",
        "Cold VM starts over the pool, by why no template was used",
        labels=["reason"],
    )
    pool: Counter[str] = Counter()
    for host, info in reports:
        warm = info.get("warm")
        if not warm:
            continue
        ready = Counter(t.get("arch", "") for t in warm["templates"] if t.get("state") == "ready")
        for arch, n in sorted(ready.items()):
            templates.add_metric([host, arch], n)
        for t in warm["selftests"]:
            labels = [host, t.get("arch", ""), t.get("qemu", ""), t.get("accel", "")]
            selftest.add_metric(labels, 1.0 if t["ok"] else 0.0)
        starts.add_metric([host, "warm"], warm.get("hits", 0))
        starts.add_metric([host, "cold"], sum(warm["misses"].values()))
        pool.update(warm["misses"])
    for reason, n in sorted(pool.items()):
        misses.add_metric([reason], n)
    yield from (templates, selftest, starts, misses)
