"""Cache volumes in the scheduler's /metrics and on its admin page, from the hosts' checked
reports (ttci.wire.caches): per host the caches' size and limit, how many, and jobs that found
a committed version (hits), started empty (misses), committed, and caches evicted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ttci.wire.caches import CACHE_COUNTS

__all__ = ["cache_metrics", "cache_rows"]

_GAUGES = {
    "bytes": ("ttci_host_cache_bytes", "Disk the host's cache volumes take"),
    "limit_bytes": ("ttci_host_cache_limit_bytes", "The host's cache limit (--cache-size)"),
    "caches": ("ttci_host_caches", "Caches (scoped keys) on the host"),
}
_COUNTERS = {
    "hits": ("ttci_host_cache_hits", "Jobs that got a clone of a committed cache version"),
    "misses": ("ttci_host_cache_misses", "Jobs whose cache started empty on this host"),
    "commits": ("ttci_host_cache_commits", "Cache versions committed by successful jobs"),
    "evictions": ("ttci_host_cache_evictions", "Whole caches evicted for room (LRU)"),
}


def cache_metrics(reports: Iterable[tuple[str, Mapping[str, Any]]]) -> Iterator[Metric]:
    """reports: (host id, its checked report); hosts without a `caches` field are left out."""
    fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        **{k: GaugeMetricFamily(n, h, labels=["host"]) for k, (n, h) in _GAUGES.items()},
        **{k: CounterMetricFamily(n, h, labels=["host"]) for k, (n, h) in _COUNTERS.items()},
    }
    for host, info in reports:
        caches = info.get("caches")
        if caches:
            for key, fam in fams.items():
                fam.add_metric([host], float(caches.get(key, 0)))
    yield from fams.values()


def cache_rows(hosts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The admin page's cache section: one row per host that reports caches."""
    return [
        {"host": h["id"], **{k: (h.get("caches") or {}).get(k, 0) for k in CACHE_COUNTS}}
        for h in hosts
        if h.get("caches")
    ]
