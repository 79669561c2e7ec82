"""The host's cache volumes: one line of committed versions per scope, cloned into jobs' VMs.

A cache (scope: owner, project, key) has at most one newest version, a frozen storage volume
(hostd/storage: a qcow2 file, or a ZFS snapshot). A job's VM gets a writable clone of it (or,
the first time, a new volume holding an empty ext4); when the job succeeds the clone becomes
the newest version: last writer wins, and every concurrent job has its own clone. A failed
job's clone is destroyed. On qcow2 a version is frozen as an overlay on the one before it (a
commit copies nothing) until MAX_CHAIN versions are stacked, then committed into a standalone
file (the chain under a clone stays short); ZFS commits every version (snapshot, promote).

Rows first: a clone's row (`cache_clones`) is written before its volume, and every volume is
recorded by hostd/storage/volumes.py before it is made, so `reconcile` after a crash or restart
removes whatever a half-done step left. Older versions go when nothing is cloned from them
(Volumes dooms them until then).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from hostd.cache.emptyfs import empty_fs, write_empty_fs
from hostd.cache.lru import CacheUse, evictions
from ttci.infra.db import Store, private_dir
from ttci.model.cache import CacheScope
from ttci.model.errors import TTError

__all__ = ["MAX_CHAIN", "VOLUME_GIB", "CacheStore", "Clone", "Volumes", "migrations"]

log = logging.getLogger("hostd.cache")
VOLUME_GIB = 16  # a cache's virtual size (sparse: only what jobs write takes room)
MAX_CHAIN = 4  # qcow2: versions a clone may sit on before a commit flattens them into one


def migrations() -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
    def caches(db: sqlite_utils.Database) -> None:
        db.table("caches").create(
            {
                "scope_id": str,
                "owner": str,
                "project": str,
                "key": str,
                "version": int,  # the newest committed version's number (0: none yet)
                "newest": str,  # its volume ("": none)
                "committed_at": float,
                "last_used": float,
                "hits": int,
                "misses": int,
                "commits": int,
            },
            pk="scope_id",
        )
        db.table("cache_clones").create(
            {"volume": str, "scope_id": str, "vm": str, "mount": str, "created_at": float},
            pk="volume",
        )
        db.table("cache_stats").create({"name": str, "n": int}, pk="name")

    return [("0010_caches", caches)]


class Volumes(Protocol):
    """What the caches use of hostd/storage/volumes.py::Volumes (the VM manager passes it in:
    both folders are on one floor)."""

    @property
    def kind(self) -> str: ...
    def get(self, name: str) -> dict[str, Any] | None: ...
    def rows(
        self, where: str | None = None, args: list[Any] | None = None
    ) -> list[dict[str, Any]]: ...
    def clone(
        self, source: str, name: str, *, kind: str, owner: str, dest: Path, size_gib: int
    ) -> Path: ...
    def create_empty(
        self, name: str, *, kind: str, owner: str, dest: Path, size_gib: int
    ) -> Path: ...
    def freeze(self, name: str) -> None: ...
    def commit(self, name: str) -> None: ...
    def destroy(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def sweep(self) -> int: ...


@dataclass(frozen=True)
class Clone:
    volume: str
    path: Path  # the disk file the VM opens
    mount: str  # where the guest mounts it


class CacheStore:
    """Thread-safe (hostd's store lock)."""

    def __init__(self, store: Store, volumes: Volumes, root: Path, limit_bytes: int) -> None:
        self.store = store
        self.volumes = volumes
        self.root = root
        self.limit_bytes = limit_bytes  # every cache volume here together; LRU eviction above
        private_dir(root)

    # -- rows --------------------------------------------------------------------------------
    def _q(self, table: str, where: str = "1", args: list[Any] | None = None) -> list[Any]:
        with self.store.lock:
            return list(self.store.db.table(table).rows_where(where, args or []))

    def _key(self, sid: str) -> dict[str, Any] | None:
        rows = self._q("caches", "scope_id = ?", [sid])
        return rows[0] if rows else None

    def _bump(self, name: str, n: int = 1) -> None:
        with self.store.lock:
            self.store.db.execute(
                "insert into cache_stats (name, n) values (?, ?) "
                "on conflict(name) do update set n = n + excluded.n",
                [name, n],
            )

    def _drop_clone(self, volume: str) -> None:
        """Its volume, then its row (a crash between: reconcile destroys the volume again)."""
        self.volumes.destroy(volume)
        with self.store.lock:
            self.store.db.table("cache_clones").delete_where("volume = ?", [volume])

    # -- a job's clone -----------------------------------------------------------------------
    def checkout(self, vm: str, scope: CacheScope, mount: str) -> Clone:
        """A clone of the scope's newest version (the empty file system the first time)."""
        sid = scope.scope_id
        volume = f"cache-{sid[:24]}-{vm.lower()}"
        dest = private_dir(self.root / sid) / f"{volume}.qcow2"
        with self.store.lock:
            key = self._key(sid) or self._new_key(scope)
            newest = key["newest"] if key["newest"] and self.volumes.get(key["newest"]) else ""
            self.store.db.table("cache_clones").insert(
                {"volume": volume, "scope_id": sid, "vm": vm, "mount": mount,
                 "created_at": time.time()}
            )  # fmt: skip
            counter = "hits" if newest else "misses"
            self.store.db.table("caches").update(
                sid, {"last_used": time.time(), counter: key[counter] + 1}
            )
        owner = f"cache:{sid}"
        try:
            if newest:
                path = self.volumes.clone(
                    newest, volume, kind="cache", owner=owner, dest=dest, size_gib=VOLUME_GIB
                )
            else:
                template = empty_fs(self.root, VOLUME_GIB)
                path = self.volumes.create_empty(
                    volume, kind="cache", owner=owner, dest=dest, size_gib=VOLUME_GIB
                )
                write_empty_fs(template, path)
        except BaseException:
            self._drop_clone(volume)
            raise
        log.info("cache %s (%s) cloned for VM %s", scope.key, "hit" if newest else "empty", vm)
        return Clone(volume, dest if dest.exists() else path, mount)

    def _new_key(self, scope: CacheScope) -> dict[str, Any]:
        key = {
            **scope.to_dict(),
            "scope_id": scope.scope_id,
            "version": 0,
            "newest": "",
            "committed_at": 0.0,
            "last_used": time.time(),
            "hits": 0,
            "misses": 0,
            "commits": 0,
        }
        self.store.db.table("caches").insert(key)
        return key

    def clone_of(self, vm: str) -> Clone | None:
        """The VM's clone, if it has one (made: its volume is ready)."""
        for row in self._q("cache_clones", "vm = ?", [vm]):
            vol = self.volumes.get(row["volume"])
            if vol is not None and vol["state"] == "ready":
                return Clone(row["volume"], Path(vol["dest"] or vol["path"]), row["mount"])
        return None

    def release(self, vm: str, commit: bool) -> None:
        """The VM is gone: commit its clone as the newest version, or destroy it."""
        for row in self._q("cache_clones", "vm = ?", [vm]):
            done = False
            if commit:
                try:
                    done = self._commit(row)
                except TTError as e:
                    log.warning("cache commit of VM %s failed; discarded: %s", vm, e)
            if not done:
                self._drop_clone(row["volume"])
        self.evict()

    def _commit(self, row: dict[str, Any]) -> bool:
        sid, volume = row["scope_id"], row["volume"]
        vol = self.volumes.get(volume)
        if self._key(sid) is None or vol is None or vol["state"] != "ready":
            return False  # deleted (tt cache del) while the job ran, or never made
        if self.volumes.kind == "qcow2" and self._depth(volume) < MAX_CHAIN:
            self.volumes.freeze(volume)  # an overlay on the versions before it: no copy
        else:
            self.volumes.commit(volume)  # qcow2: copies the chain into it; ZFS: promotes
        with self.store.lock:
            key = self._key(sid)
            if key is None:
                return False
            self.store.db.table("caches").update(
                sid,
                {
                    "newest": volume,
                    "version": key["version"] + 1,
                    "committed_at": time.time(),
                    "last_used": time.time(),
                    "commits": key["commits"] + 1,
                },
            )
            self.store.db.table("cache_clones").delete_where("volume = ?", [volume])
        if key["newest"]:
            self.volumes.destroy(key["newest"])  # doomed until its last clone is gone
        log.info("cache %s: version %d committed from VM %s", key["key"], key["version"] + 1,
                 row["vm"])  # fmt: skip
        return True

    def _depth(self, volume: str) -> int:
        """How many volumes it sits on (its sources, back to one that depends on none)."""
        depth, row = 0, self.volumes.get(volume)
        while row is not None and row["source"]:
            depth, row = depth + 1, self.volumes.get(row["source"])
        return depth

    # -- eviction and deletion ---------------------------------------------------------------
    def _volumes_of(self, sid: str) -> list[dict[str, Any]]:
        return self.volumes.rows("owner = ?", [f"cache:{sid}"])

    def usage(self) -> list[CacheUse]:
        out = []
        for k in self._q("caches"):
            vols = self._volumes_of(k["scope_id"])
            size = sum(self.volumes.size(v["name"]) for v in vols)
            busy = bool(self._q("cache_clones", "scope_id = ?", [k["scope_id"]]))
            out.append(CacheUse(k["scope_id"], k["last_used"], size, busy))
        return out

    def total_bytes(self) -> int:
        return sum(self.volumes.size(v["name"]) for v in self.volumes.rows("kind = 'cache'"))

    def evict(self) -> list[str]:
        """Whole least recently used caches, until the host's caches fit the limit."""
        gone = evictions(self.usage(), self.total_bytes(), self.limit_bytes)
        for sid in gone:
            log.info("cache %s evicted (host limit %d bytes)", sid, self.limit_bytes)
            self.drop(sid)
            self._bump("evictions")
        return gone

    def drop(self, sid: str) -> bool:
        """Forget a whole cache: its versions go now; clones in use when their VM goes."""
        with self.store.lock:
            key = self._key(sid)
            self.store.db.table("caches").delete_where("scope_id = ?", [sid])
        if key and key["newest"]:
            self.volumes.destroy(key["newest"])
        return key is not None

    # -- views and recovery ------------------------------------------------------------------
    def listing(self) -> list[dict[str, Any]]:
        """Every cache on this host: its scope, newest version, bytes, use counts."""
        use = {u.scope_id: u for u in self.usage()}
        fields = ("owner", "project", "key", "version", "committed_at", "last_used")
        return [
            {
                "scope_id": r["scope_id"],
                **{f: r[f] for f in fields},
                **{f: r[f] for f in ("hits", "misses", "commits")},
                "bytes": use[r["scope_id"]].bytes if r["scope_id"] in use else 0,
                "in_use": use[r["scope_id"]].in_use if r["scope_id"] in use else False,
            }
            for r in self._q("caches")
        ]

    def stats(self) -> dict[str, int]:
        with self.store.lock:
            sums = self.store.db.execute(
                "select count(*), coalesce(sum(hits), 0), coalesce(sum(misses), 0), "
                "coalesce(sum(commits), 0) from caches"
            ).fetchone()
        counters = {r["name"]: r["n"] for r in self._q("cache_stats")}
        return {
            "caches": sums[0],
            "hits": sums[1],
            "misses": sums[2],
            "commits": sums[3],
            "evictions": counters.get("evictions", 0),
            "bytes": self.total_bytes(),
            "limit_bytes": self.limit_bytes,
        }

    def report(self, most: int = 1000) -> dict[str, Any]:
        """For the scheduler (placement prefers a host holding a cache's newest version): the
        caches with a version here, scope id -> when it was committed (the newest `most`), and
        the counts."""
        with self.store.lock:
            rows = self.store.db.execute(
                "select scope_id, committed_at from caches where newest != '' "
                "order by committed_at desc limit ?",
                [most],
            ).fetchall()
        return {"held": {sid: at for sid, at in rows}, **self.stats()}

    def reconcile(self, live_vms: set[str]) -> int:
        """After a start: clones of VMs that are gone (or half made) are destroyed, a newest
        version that is gone forgotten, and cache volumes no cache row owns destroyed."""
        n = 0
        for row in self._q("cache_clones"):
            vol = self.volumes.get(row["volume"])
            if row["vm"] not in live_vms or vol is None or vol["state"] != "ready":
                self._drop_clone(row["volume"])
                n += 1
        keys = {k["scope_id"]: k for k in self._q("caches")}
        clones = {r["volume"] for r in self._q("cache_clones")}
        newest = {k["newest"] for k in keys.values()}
        for k in keys.values():
            if k["newest"] and self.volumes.get(k["newest"]) is None:
                with self.store.lock:
                    self.store.db.table("caches").update(k["scope_id"], {"newest": ""})
        for vol in self.volumes.rows("kind = 'cache'"):
            if vol["name"] not in clones | newest and vol["state"] != "doomed":
                self.volumes.destroy(vol["name"])
                n += 1
        self.volumes.sweep()
        for tmp in self.root.glob(".*.tmp"):  # an empty file system cut short (emptyfs.py)
            tmp.unlink(missing_ok=True)
        for d in self.root.iterdir():
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        return n
