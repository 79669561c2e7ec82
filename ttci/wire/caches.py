"""Cache volumes in a host's report (hostd.cache.store.CacheStore.report), checked. Pure.

The scheduler's placement prefers a host that holds the newest version of a job's cache: hostd
reports, per cache it holds a version of (by scope id), when that version was committed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ttci.model.errors import BadInput

__all__ = ["CACHE_COUNTS", "MAX_HELD", "newest_by_host", "newest_holders", "parse_cache_report"]

MAX_HELD = 1000
CACHE_COUNTS = ("caches", "hits", "misses", "commits", "evictions", "bytes", "limit_bytes")
_SID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise BadInput(f"{where} must be a whole number >= 0", hint="send hostd's report")
    return v


def parse_cache_report(v: Any) -> dict[str, Any]:
    """{"held": {scope_id: committed_at}, counts...} checked: only known keys, bounded."""
    if not isinstance(v, dict):
        raise BadInput("caches must be an object", hint="send hostd's report")
    held = v.get("held", {})
    if not isinstance(held, dict) or len(held) > MAX_HELD:
        raise BadInput(f"caches.held must be an object of at most {MAX_HELD}", hint="fewer")
    out: dict[str, Any] = {"held": {}}
    for sid, at in held.items():
        ok = isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)
        if not isinstance(sid, str) or not _SID_RE.match(sid) or not ok or at < 0:
            raise BadInput("caches.held maps scope ids to commit times", hint="send hostd's")
        out["held"][sid] = float(at)
    for key in CACHE_COUNTS:
        if key in v:
            out[key] = _count(v[key], f"caches.{key}")
    return out


def newest_holders(scope_id: str, held: dict[str, dict[str, float]]) -> frozenset[str]:
    """The hosts (host -> its held map) holding the newest committed version of scope_id."""
    times = {h: m[scope_id] for h, m in held.items() if scope_id in m}
    if not times:
        return frozenset()
    newest = max(times.values())
    return frozenset(h for h, t in times.items() if t == newest)


def newest_by_host(held: dict[str, dict[str, float]]) -> dict[str, frozenset[str]]:
    """Per host, the scope ids whose newest committed version (over all hosts) it holds."""
    newest: dict[str, float] = {}
    for m in held.values():
        for sid, at in m.items():
            newest[sid] = max(at, newest.get(sid, at))
    return {h: frozenset(s for s, at in m.items() if at == newest[s]) for h, m in held.items()}
