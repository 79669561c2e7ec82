"""hostd's cache routes (the scheduler's `tt cache list/del` fan out to them) and the caches'
metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hostd.vm.manager import NotFound, VMManager

__all__ = ["bp", "cache_metrics", "delete_cache", "list_caches"]

bp = Blueprint("hostd_caches", __name__, url_prefix="/v1/caches")


def _mgr() -> VMManager:
    mgr: VMManager = current_app.config["VMS"]
    return mgr


@bp.get("")
def list_caches() -> Response:
    """Every cache on this host (?owner= keeps one owner's)."""
    owner = request.args.get("owner")
    rows = _mgr().caches.listing()
    return jsonify([r for r in rows if owner is None or r["owner"] == owner])


@bp.delete("/<scope_id>")
def delete_cache(scope_id: str) -> tuple[str, int]:
    """Forget a cache (its versions go now; a clone in use is discarded when its VM goes)."""
    if not _mgr().caches.drop(scope_id):
        raise NotFound(f"no cache {scope_id[:40]} on host {_mgr().cfg.host_id}")
    return "", 204


def cache_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """ttci_hostd_cache_*: size and limit, caches, hits, misses, commits, evictions."""
    yield GaugeMetricFamily(
        "ttci_hostd_cache_bytes", "Disk the cache volumes take", value=float(stats["bytes"])
    )
    yield GaugeMetricFamily(
        "ttci_hostd_cache_limit_bytes",
        "The cache volumes' limit (--cache-size; LRU eviction above)",
        value=float(stats["limit_bytes"]),
    )
    yield GaugeMetricFamily("ttci_hostd_caches", "Caches on this host", value=stats["caches"])
    for name, what in (
        ("hits", "Jobs that got a clone of a committed version"),
        ("misses", "Jobs that started from an empty cache"),
        ("commits", "Versions committed by successful jobs"),
        ("evictions", "Whole caches evicted for room"),
    ):
        yield CounterMetricFamily(f"ttci_hostd_cache_{name}", what, value=float(stats[name]))
