"""The pool of hosts: static ones (`--server-set`) and ones that register with a join token.

Registered hosts heartbeat; a host not heard from for `timeout` seconds is marked down and its
VMs lost. Static hosts are polled. Host records live in the scheduler's SQLite state, so a
restarted scheduler knows its pool at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ttci.infra.db import Store, now
from ttci.model.arch import Arch
from ttci.model.errors import TTError
from ttci.model.resources import Resources
from ttci.scheduler.hostd_client import HostdClient, HostdError
from ttci.scheduler.planning.placement import HostView
from ttci.wire.hosts import HOST_ID_RE, URL_RE, Heartbeat, HostRegistration, JoinAnswer

__all__ = [
    "HOST_ID_RE",
    "URL_RE",
    "HostNotFound",
    "HostPool",
    "HostRefused",
    "check_registration",
    "effective_free",
    "kvm_arches",
]

log = logging.getLogger("ttci.scheduler.hosts")


class HostNotFound(TTError):
    """No host of that id in the pool."""


class HostRefused(TTError):
    """A host may not join: wrong token, incompatible version, or a name clash."""


def check_registration(reg: HostRegistration, static_ids: set[str]) -> None:
    """Refuse a registration (already validated as a document) that takes a static host's id."""
    if reg.id in static_ids:
        raise HostRefused(
            f"host id {reg.id!r} is a static host of this scheduler",
            hint="give the registering hostd another --host-id",
        )


def effective_free(info: dict[str, Any], committed: Resources) -> Resources:
    """What placement may still use on a host: its total minus what the scheduler has put there,
    and never more than the host itself says is free. Pure."""
    total = Resources.from_dict(info.get("total", {}))
    reported = Resources.from_dict(info.get("free", {}))
    mine = total - committed
    return Resources(
        min(reported.cpus, mine.cpus),
        min(reported.memory_mib, mine.memory_mib),
        min(reported.disk_gib, mine.disk_gib),
    )


class HostPool:
    def __init__(
        self,
        store: Store,
        static: dict[str, tuple[str, str]],
        *,
        join_token: str = "",
        timeout: float = 15.0,
        on_down: Callable[[str, str], None] | None = None,
        on_up: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.static = static
        self.join_token = join_token
        self.timeout = timeout
        self.on_down = on_down or (lambda hid, why: None)
        self.on_up = on_up or (lambda hid: None)
        self._clients: dict[str, HostdClient] = {}
        self._version = 0  # bumped by every write: the public list is cached per version
        self._cache: tuple[int, list[dict[str, Any]]] = (-1, [])
        self._clients_lock = threading.Lock()
        with store.lock:
            for hid, (url, _) in static.items():
                old = store.db.table("hosts").get(hid) if self._exists(hid) else {}
                store.db.table("hosts").upsert(
                    {
                        "id": hid,
                        "url": url,
                        "kind": "static",
                        "state": old.get("state", "unknown"),
                        "last_seen": old.get("last_seen", ""),
                        "info": old.get("info", "{}"),
                        "drained": old.get("drained", 0),
                    },
                    pk="id",
                )

    def _exists(self, hid: str) -> bool:
        return bool(self.store.db.table("hosts").count_where("id = ?", [hid]))

    # -- records -----------------------------------------------------------------------------
    def row(self, hid: str) -> dict[str, Any]:
        with self.store.lock:
            rows = list(self.store.db.table("hosts").rows_where("id = ?", [hid]))
        if not rows:
            raise HostNotFound(f"no host {hid!r} in the pool", hint="see `tt status --server`")
        return rows[0]

    def rows(self) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("hosts").rows_where(order_by="id"))

    def client(self, hid: str) -> HostdClient:
        row = self.row(hid)
        token = self.static[hid][1] if hid in self.static else row["token"]
        with self._clients_lock:
            c = self._clients.get(hid)
            if c is None or c.url != row["url"].rstrip("/") or c.token != token:
                c = self._clients[hid] = HostdClient(hid, row["url"], token)
            return c

    def public_all(self) -> list[dict[str, Any]]:
        """Every host as the API shows it; rebuilt only after a host record changed."""
        with self.store.lock:
            version, cached = self._cache
            if version != self._version:
                version = self._version
                cached = [self.public(r) for r in self.rows()]
                self._cache = (version, cached)
            return cached

    @staticmethod
    def public(row: dict[str, Any]) -> dict[str, Any]:
        """A host as the API shows it (never its token)."""
        return {
            "id": row["id"],
            "url": row["url"],
            "kind": row["kind"],
            "state": row["state"],
            "drained": bool(row["drained"]),
            "last_seen": row["last_seen"],
            **({"error": row["error"]} if row.get("error") else {}),
            **json.loads(row["info"] or "{}"),
        }

    # -- joining -----------------------------------------------------------------------------
    def register(self, reg: HostRegistration) -> JoinAnswer:
        check_registration(reg, set(self.static))
        with self.store.lock:
            was = self.store.db.table("hosts").get(reg.id) if self._exists(reg.id) else None
            self._version += 1
            self.store.db.table("hosts").upsert(
                {
                    "id": reg.id,
                    "url": reg.url,
                    "kind": "registered",
                    "token": reg.token,
                    "state": "up",
                    "last_seen": now(),
                    "seen_mono": time.monotonic(),
                    "info": json.dumps(dict(reg.info)),
                    "error": "",
                    "drained": was["drained"] if was else 0,
                },
                pk="id",
            )
        log.info("host %s registered from %s", reg.id, reg.url)
        if was is None or was["state"] != "up":
            self._came_up(reg.id)
        return JoinAnswer(reg.id, max(1.0, self.timeout / 3))

    def heartbeat(self, beat: Heartbeat) -> JoinAnswer:
        row = self.row(beat.id)
        if row["kind"] != "registered":
            raise HostRefused(
                f"host {beat.id} is static", hint="static hosts are polled, not pushed"
            )
        self._seen(beat.id, dict(beat.info), was=row["state"])
        return JoinAnswer(beat.id, max(1.0, self.timeout / 3))

    def _seen(self, hid: str, info: dict[str, Any], was: str) -> None:
        """The host answered (heartbeat or poll) with its current info."""
        with self.store.lock:
            self._version += 1
            self.store.db.table("hosts").update(
                hid,
                {
                    "state": "up",
                    "last_seen": now(),
                    "seen_mono": time.monotonic(),
                    "info": json.dumps(info),
                    "error": "",
                },
            )
        if was != "up":
            log.info("host %s is up", hid)
            self._came_up(hid)

    def set_drain(self, hid: str, drained: bool) -> dict[str, Any]:
        self.row(hid)
        with self.store.lock:
            self._version += 1
            self.store.db.table("hosts").update(hid, {"drained": int(drained)})
        log.info("host %s %s", hid, "drained" if drained else "undrained")
        return self.public(self.row(hid))

    def forget(self, hid: str) -> None:
        """Remove a registered host that is down (its VMs must be gone already)."""
        row = self.row(hid)
        if row["kind"] == "static":
            raise HostRefused(f"host {hid} is static", hint="remove it from --server-set")
        with self.store.lock:
            self._version += 1
            self.store.db.table("hosts").delete(hid)

    # -- health ------------------------------------------------------------------------------
    def poll_static(self) -> None:
        for hid in self.static:
            try:
                info = self.client(hid).info()
            except HostdError as e:
                self._mark_down(hid, e.message)
                continue
            self._seen(hid, info, was=self.row(hid)["state"])

    def _came_up(self, hid: str) -> None:
        """Re-attach a host's VMs off the request path (the host may still be starting)."""
        threading.Thread(target=self.on_up, args=(hid,), name=f"host-up-{hid}", daemon=True).start()

    def refresh(self, hids: set[str]) -> None:
        """Ask these hosts for their state now (after VMs came or went), so capacity and use
        shown and placed from are current; a host that does not answer is left to the monitor."""

        def one(hid: str) -> None:
            try:
                if self.row(hid)["state"] == "down":
                    return
                info = self.client(hid).info()
            except (HostdError, HostNotFound):
                return
            self._seen(hid, info, was="up")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, sorted(hids)))

    def check_timeouts(self) -> None:
        limit = time.monotonic() - self.timeout
        for row in self.rows():
            stale = (row.get("seen_mono") or 0) < limit
            if row["kind"] == "registered" and row["state"] == "up" and stale:
                self._mark_down(hid=row["id"], why=f"no heartbeat for {self.timeout:g} s")

    def mark_unreachable(self, hid: str, why: str) -> None:
        self._mark_down(hid, why)

    def _mark_down(self, hid: str, why: str) -> None:
        was = self.row(hid)["state"]
        with self.store.lock:
            self._version += 1
            self.store.db.table("hosts").update(hid, {"state": "down", "error": why})
        if was != "down":
            log.warning("host %s is down: %s", hid, why)
            self.on_down(hid, why)

    def views(self, committed: dict[str, Resources]) -> list[HostView]:
        out = []
        for row in self.rows():
            info = json.loads(row["info"] or "{}")
            out.append(
                HostView(
                    id=row["id"],
                    free=effective_free(info, committed.get(row["id"], Resources())),
                    images=frozenset(i["name"] for i in info.get("images", [])),
                    up=row["state"] == "up",
                    draining=bool(row["drained"]),
                    kvm_arches=kvm_arches(info),
                )
            )
        return out


def kvm_arches(info: dict[str, Any]) -> frozenset[str]:
    """The arches a host runs natively under KVM (its probe boot said KVM works)."""
    if info.get("accel") != "kvm":
        return frozenset()
    return frozenset(a.value for a in Arch if a.is_native(str(info.get("machine", ""))))
