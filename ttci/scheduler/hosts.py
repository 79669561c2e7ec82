"""The pool of hosts: static ones (`--server-set`) and ones that register with a join token.

Registered hosts heartbeat (to any replica); a host not heard from for `timeout` seconds (by
the wall clock) is marked down and its VMs lost. Static hosts are polled. Host records live in
the scheduler's database, so a restarted scheduler (or another replica) knows its pool at once.

Identity: a registered host's id is bound to the token it first registered with (the one the
scheduler sends it). Registering the id again needs that token (or, to change it, the old one as
`current_token`), or an admin forgets the host first; every heartbeat bears it. A host's report
is checked against its schema (ttci.wire.hosts.parse_report) and stored apart from the fields
the scheduler owns; a malformed one makes that host `unhealthy` with the reason (out of
placement and the catalogue, its VMs untouched) until a good report comes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ttci.infra.db import now
from ttci.infra.sql import SqlStore
from ttci.model.arch import Arch
from ttci.model.errors import BadInput, TTError
from ttci.model.resources import Resources
from ttci.scheduler.hostd_client import HostdClient, HostdError
from ttci.scheduler.planning.placement import HostView
from ttci.wire.caches import newest_by_host
from ttci.wire.hosts import (
    HOST_ID_RE,
    URL_RE,
    Heartbeat,
    HostRegistration,
    JoinAnswer,
    parse_report,
)

__all__ = [
    "HOST_ID_RE",
    "URL_RE",
    "HostClaimed",
    "HostNotFound",
    "HostPool",
    "HostRefused",
    "check_registration",
    "credential_ok",
    "effective_free",
    "host_api",
    "kvm_arches",
    "stored_report",
]

log = logging.getLogger("ttci.scheduler.hosts")


class HostNotFound(TTError):
    """No host of that id in the pool."""


class HostRefused(TTError):
    """A host may not join: wrong token, incompatible version, or a name clash."""


class HostClaimed(HostRefused):
    """The host id is bound to another host's credential."""


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def credential_ok(given: str, row: dict[str, Any]) -> bool:
    """Whether given is the credential a registered host's id is bound to (constant time)."""
    bound = str(row.get("token") or "")
    return bool(given) and bool(bound) and hmac.compare_digest(_sha(given), _sha(bound))


def stored_report(row: dict[str, Any]) -> dict[str, Any]:
    """A host record's report, checked again (a record written before reports were checked
    may hold anything): {} when it does not pass."""
    try:
        return parse_report(json.loads(row.get("info") or "{}"))
    except (ValueError, BadInput):
        return {}


def host_api(row: dict[str, Any]) -> int | None:
    """The API version a host's report says it speaks (None: unknown, taken as ours)."""
    try:
        api = json.loads(row.get("info") or "{}").get("api")
    except (ValueError, AttributeError):
        return None
    return api if type(api) is int else None


def _redact(text: str, url: str) -> str:
    """text without the host's address (for users who are not admins)."""
    m = URL_RE.match(url)
    addr = url.split("://", 1)[-1].rsplit(":", 1)[0] if m else ""
    for secret in filter(None, (url, addr)):
        text = text.replace(secret, "(host address)")
    return text


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
        store: SqlStore,
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
        # Every write bumps the hosts counter in the database (in its transaction), so each
        # replica rebuilds its cached public lists after any replica changed a host.
        # Per admin or not: (hosts version, the public list, the list as JSON once asked for).
        self._cache: dict[bool, tuple[int, list[dict[str, Any]], bytes | None]] = {}
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

    def _bump(self) -> None:
        """A host record changes (the caller holds the store's lock)."""
        self.store.db.execute("update counters set n = n + 1 where name = 'hosts'")

    def _version(self) -> int:
        row = self.store.db.execute("select n from counters where name = 'hosts'").fetchone()
        return int(row[0]) if row else 0

    def _exists(self, hid: str) -> bool:
        return bool(self.store.db.table("hosts").count_where("id = ?", [hid]))

    # -- records -----------------------------------------------------------------------------
    def row(self, hid: str) -> dict[str, Any]:
        rows = self.store.db.table("hosts").rows_where("id = ?", [hid])
        if not rows:
            raise HostNotFound(f"no host {hid!r} in the pool", hint="see `tt status --server`")
        return rows[0]

    def rows(self) -> list[dict[str, Any]]:
        return self.store.db.table("hosts").rows_where(order_by="id")

    def client(self, hid: str) -> HostdClient:
        row = self.row(hid)
        token = self.static[hid][1] if hid in self.static else row["token"]
        api = host_api(row)  # a host one release behind is spoken to in its version
        with self._clients_lock:
            c = self._clients.get(hid)
            if c is None or c.url != row["url"].rstrip("/") or c.token != token or c.api != api:
                c = self._clients[hid] = HostdClient(hid, row["url"], token, api=api)
            return c

    def public_all(self, admin: bool = True) -> list[dict[str, Any]]:
        """Every host as the API shows it (to an admin, or without addresses to anyone else);
        rebuilt only after a host record changed."""
        return self._public(admin)[1]

    def public_body(self, admin: bool, dumps: Callable[[Any], str]) -> bytes:
        """public_all encoded by dumps, encoded again only after a host record changed: a
        hundred hosts' reports are the API's largest frequent read."""
        version, hosts, body = self._public(admin)
        if body is None:
            body = dumps(hosts).encode() + b"\n"
            self._cache[admin] = (version, hosts, body)
        return body

    def _public(self, admin: bool) -> tuple[int, list[dict[str, Any]], bytes | None]:
        now = self._version()  # rows read after it are at least as new
        entry = self._cache.get(admin)
        if entry is None or entry[0] != now:
            entry = (now, [self.public(r, admin=admin) for r in self.rows()], None)
            self._cache[admin] = entry
        return entry

    @staticmethod
    def public(row: dict[str, Any], admin: bool = True) -> dict[str, Any]:
        """A host as the API shows it: its checked report, then the fields the scheduler owns
        (a report can never override them); never its token, and its address only to admins."""
        error = row.get("error") or ""
        owned = {
            "id": row["id"],
            **({"url": row["url"]} if admin else {}),
            "kind": row["kind"],
            "state": row["state"],
            "drained": bool(row["drained"]),
            "last_seen": row["last_seen"],
            **({"error": error if admin else _redact(error, row["url"])} if error else {}),
        }
        return {**stored_report(row), **owned}

    # -- joining -----------------------------------------------------------------------------
    def register(self, reg: HostRegistration) -> JoinAnswer:
        """Join (or join again) a host. The id's first registration binds it to reg.token.

        Raises:
            HostRefused: a static host's id. HostClaimed: the id is bound to another token.
        """
        check_registration(reg, set(self.static))
        report, problem = _check_report(reg.info)
        with self.store.lock:
            was = self.store.db.table("hosts").get(reg.id) if self._exists(reg.id) else None
            if was is not None:
                self._check_claim(reg, was)
            self._bump()
            self.store.db.table("hosts").upsert(
                {
                    "id": reg.id,
                    "url": reg.url,
                    "kind": "registered",
                    "token": reg.token,
                    "state": "unhealthy" if problem else "up",
                    "last_seen": now(),
                    "seen_at": time.time(),
                    "info": json.dumps(report) if not problem else (was or {}).get("info", "{}"),
                    "error": problem,
                    "drained": was["drained"] if was else 0,
                },
                pk="id",
            )
        moved = was is not None and (was["url"] != reg.url or was["token"] != reg.token)
        log.info("host %s registered from %s%s", reg.id, reg.url, " (changed)" if moved else "")
        if problem:
            log.warning("host %s is unhealthy: %s", reg.id, problem)
        elif was is None or was["state"] != "up":
            self._came_up(reg.id)
        return JoinAnswer(reg.id, max(1.0, self.timeout / 3), problem)

    @staticmethod
    def _check_claim(reg: HostRegistration, was: dict[str, Any]) -> None:
        """A registered id joins again only with its bound token (or the old one, to change
        it). The caller holds the store's lock."""
        if was["kind"] != "registered":
            return
        if credential_ok(reg.token, was) or credential_ok(reg.current_token, was):
            return
        log.warning("refused a registration of host %s: not its credential", reg.id)
        raise HostClaimed(
            f"host id {reg.id!r} is registered by another host (its token differs)",
            hint="give this hostd its old token, another --host-id, or have an admin run "
            f"`tt host forget {reg.id}` first",
        )

    def heartbeat(self, beat: Heartbeat, credential: str) -> JoinAnswer:
        """A registered host's report, bearing its credential (the token it registered with).

        Raises:
            HostNotFound: no such host (it should register again). HostRefused: a static host,
            or not this host's credential.
        """
        row = self.row(beat.id)
        if row["kind"] != "registered":
            raise HostRefused(
                f"host {beat.id} is static", hint="static hosts are polled, not pushed"
            )
        if not credential_ok(credential, row):
            log.warning("refused a heartbeat for host %s: not its credential", beat.id)
            raise HostRefused(
                f"this heartbeat does not bear host {beat.id}'s token",
                hint="a host beats with the token it registered with",
            )
        problem = self._report(beat.id, beat.info, was=row["state"])
        return JoinAnswer(beat.id, max(1.0, self.timeout / 3), problem)

    def _report(self, hid: str, info: Any, was: str) -> str:
        """A host answered (heartbeat or poll) with this report: it is up, or unhealthy when
        the report is malformed (the reason is returned)."""
        report, problem = _check_report(info)
        if problem:
            self._mark_unhealthy(hid, problem)
        else:
            self._seen(hid, report, was)
        return problem

    def _seen(self, hid: str, info: dict[str, Any], was: str) -> None:
        """The host answered with its current (checked) report."""
        with self.store.lock:
            self._bump()
            self.store.db.table("hosts").update(
                hid,
                {
                    "state": "up",
                    "last_seen": now(),
                    "seen_at": time.time(),
                    "info": json.dumps(info),
                    "error": "",
                },
            )
        if was != "up":
            log.info("host %s is up", hid)
            self._came_up(hid)

    def _mark_unhealthy(self, hid: str, why: str) -> None:
        """The host answers but its report is malformed: out of placement, VMs untouched."""
        with self.store.lock:
            was = self.store.db.table("hosts").get(hid)["state"]
            self._bump()
            self.store.db.table("hosts").update(
                hid,
                {
                    "state": "unhealthy",
                    "last_seen": now(),
                    "seen_at": time.time(),
                    "error": why,
                },
            )
        if was != "unhealthy":
            log.warning("host %s is unhealthy: %s", hid, why)

    def set_drain(self, hid: str, drained: bool) -> dict[str, Any]:
        self.row(hid)
        with self.store.lock:
            self._bump()
            self.store.db.table("hosts").update(hid, {"drained": int(drained)})
        log.info("host %s %s", hid, "drained" if drained else "undrained")
        return self.public(self.row(hid))

    def forget(self, hid: str) -> None:
        """Remove a registered host that is down (its VMs must be gone already); its id is
        free for any host holding the join token."""
        row = self.row(hid)
        if row["kind"] == "static":
            raise HostRefused(f"host {hid} is static", hint="remove it from --server-set")
        with self.store.lock:
            self._bump()
            self.store.db.table("hosts").delete(hid)
        log.info("host %s forgotten", hid)

    # -- health ------------------------------------------------------------------------------
    def poll_static(self) -> None:
        for hid in self.static:
            try:
                info = self.client(hid).info()
            except HostdError as e:
                self._mark_down(hid, e.message)
                continue
            self._report(hid, info, was=self.row(hid)["state"])

    def _came_up(self, hid: str) -> None:
        """Re-attach a host's VMs off the request path (the host may still be starting)."""
        threading.Thread(target=self.on_up, args=(hid,), name=f"host-up-{hid}", daemon=True).start()

    def refresh(self, hids: set[str]) -> None:
        """Ask these hosts for their state now (after VMs came or went), so capacity and use
        shown and placed from are current; a host that does not answer is left to the monitor."""

        def one(hid: str) -> None:
            try:
                state = self.row(hid)["state"]
                if state == "down":
                    return
                info = self.client(hid).info()
            except (HostdError, HostNotFound):
                return
            self._report(hid, info, was=state)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, sorted(hids)))

    def check_timeouts(self) -> None:
        limit = time.time() - self.timeout
        for row in self.rows():
            stale = (row.get("seen_at") or 0) < limit
            alive = row["state"] in ("up", "unhealthy")
            if row["kind"] == "registered" and alive and stale:
                self._mark_down(hid=row["id"], why=f"no heartbeat for {self.timeout:g} s")

    def mark_unreachable(self, hid: str, why: str) -> None:
        self._mark_down(hid, why)

    def _mark_down(self, hid: str, why: str) -> None:
        was = self.row(hid)["state"]
        with self.store.lock:
            self._bump()
            self.store.db.table("hosts").update(hid, {"state": "down", "error": why})
        if was != "down":
            log.warning("host %s is down: %s", hid, why)
            self.on_down(hid, why)

    def views(self, committed: dict[str, Resources]) -> list[HostView]:
        out = []
        rows = [(row, stored_report(row)) for row in self.rows()]
        caches = newest_by_host({r["id"]: i.get("caches", {}).get("held", {}) for r, i in rows})
        for row, info in rows:
            out.append(
                HostView(
                    id=row["id"],
                    free=effective_free(info, committed.get(row["id"], Resources())),
                    images=frozenset(i["name"] for i in info.get("images", [])),
                    up=row["state"] == "up",
                    draining=bool(row["drained"]),
                    kvm_arches=kvm_arches(info),
                    caches=caches.get(row["id"], frozenset()),
                )
            )
        return out


def _check_report(info: Any) -> tuple[dict[str, Any], str]:
    """(the checked report, "") or ({}, why it is malformed)."""
    try:
        return parse_report(info), ""
    except BadInput as e:
        return {}, e.message


def kvm_arches(info: dict[str, Any]) -> frozenset[str]:
    """The arches a host runs natively under KVM (its probe boot said KVM works)."""
    if info.get("accel") != "kvm":
        return frozenset()
    return frozenset(a.value for a in Arch if a.is_native(str(info.get("machine", ""))))
