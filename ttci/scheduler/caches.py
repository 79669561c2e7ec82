"""Cache volumes across the pool: `tt cache list` and `tt cache del` (hosts keep the caches; the
scheduler asks the hosts that are up and merges what they say).

A cache is scoped: (owner, project, KEY). A user sees and deletes their own; an admin all. The
scope's id is the one hostd names the cache by (ttci/model/cache.py::CacheScope.scope_id).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from ttci.model.cache import CacheScope, check_key
from ttci.model.errors import TTError
from ttci.scheduler.core import PARALLEL_CREATES, SchedulerCore
from ttci.scheduler.hostd_client import HostdClient
from ttci.scheduler.users import User

__all__ = ["CacheNotFound", "Caches", "merge_caches"]

log = logging.getLogger("ttci.scheduler.caches")


class CacheNotFound(TTError):
    """No such cache (or not yours)."""


def merge_caches(per_host: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per scope: its hosts, bytes in all, the newest version's host and time, hits,
    misses and commits summed."""
    out: dict[str, dict[str, Any]] = {}
    for host, rows in sorted(per_host.items()):
        for r in rows:
            m = out.setdefault(
                r["scope_id"],
                {
                    **{k: r[k] for k in ("owner", "project", "key")},
                    "hosts": [],
                    "bytes": 0,
                    "newest_host": "",
                    "committed_at": 0.0,
                    "last_used": 0.0,
                    "hits": 0,
                    "misses": 0,
                    "commits": 0,
                    "in_use": False,
                },
            )
            m["hosts"].append(host)
            for k in ("bytes", "hits", "misses", "commits"):
                m[k] += int(r.get(k) or 0)
            m["in_use"] = m["in_use"] or bool(r.get("in_use"))
            m["last_used"] = max(m["last_used"], float(r.get("last_used") or 0))
            if float(r.get("committed_at") or 0) > m["committed_at"]:
                m["committed_at"], m["newest_host"] = float(r["committed_at"]), host
    return sorted(out.values(), key=lambda m: (m["owner"], m["project"], m["key"]))


class Caches(SchedulerCore):
    def _each_host(self, call: Callable[[HostdClient], Any]) -> dict[str, Any]:
        """call on each host that is up, in parallel: host -> its answer (failures are logged
        and left out)."""
        ups = [h["id"] for h in self.hosts() if h["state"] == "up"]
        out: dict[str, Any] = {}

        def one(hid: str) -> None:
            try:
                out[hid] = call(self._client(hid))
            except TTError as e:
                log.warning("host %s: cache request failed: %s", hid, e)

        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            list(pool.map(one, ups))
        return out

    def list_caches(self, user: User) -> list[dict[str, Any]]:
        """The pool's caches: the user's own, every one for an admin."""
        per_host = self._each_host(lambda c: c.caches())
        if not user.admin:
            per_host = {h: [r for r in v if r["owner"] == user.name] for h, v in per_host.items()}
        return merge_caches(per_host)

    def delete_cache(
        self, user: User, key: str, project: str = "", owner: str = ""
    ) -> dict[str, Any]:
        """Delete a cache on every host. project: its CI project (default: the user's own
        caches, `user:NAME`); owner: an admin deleting another account's cache."""
        check_key(key)
        owner = owner if owner and user.admin else user.name
        scope = CacheScope(owner, project or f"user:{owner}", key)
        answers = self._each_host(lambda c: c.delete_cache(scope.scope_id))
        gone = [h for h, deleted in answers.items() if deleted]
        if not gone:
            raise CacheNotFound(
                f"no cache {key!r} of {scope.project} (owner {owner}) on any host",
                hint="see `tt cache list`; a CI project's cache needs --project",
            )
        log.info("cache %s of %s deleted on %s", key, scope.project, sorted(gone))
        return {**scope.to_dict(), "deleted": True, "hosts": sorted(gone)}
