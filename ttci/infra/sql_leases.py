"""Leases: which process (replica) runs each background loop, through rows of the database.

Every replica of a service shares one database. A loop that must run exactly once across them
(the reaper, the queue dispatcher, the host monitor, the GitHub dispatcher and reconciler) runs
only while its replica holds the loop's lease: a row (name, holder, expires_at) that its holder
renews every RENEW_S seconds for TTL_S more. Anyone may take a lease that expired, in one
statement (an upsert whose update only happens when the row is ours or stale), so at most one
holder wins. A killed holder stops renewing and another replica takes over within TTL_S +
RENEW_S seconds; a holder that cannot reach the database stops acting once its own lease ran
out. Each replica also holds `replica:<its id>`: others see it alive (an ENV it was creating is
left to it while it lives). Holders' clocks must agree to well under TTL_S (NTP).

Portable SQL, so one scheduler on SQLite takes every lease at once, the same way.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from ttci.infra.sql import Database, DatabaseUnavailable, SqlStore

__all__ = ["RENEW_S", "TTL_S", "Leases", "create_table", "replica_id"]

log = logging.getLogger("ttci.leases")
TTL_S = 3.0
RENEW_S = 1.0
REPLICA = "replica:"


def replica_id() -> str:
    """This process's name among replicas: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def create_table(db: Database) -> None:
    """The leases table (part of a service's migrations)."""
    db.table("leases").create(
        {"name": str, "holder": str, "expires_at": float, "since": float}, pk="name"
    )


class Leases:
    """This process's leases on `names` (see the module's docstring); `start` keeps them."""

    def __init__(
        self, store: SqlStore, names: Iterable[str], *, ttl: float = TTL_S, every: float = RENEW_S
    ) -> None:
        self.store = store
        self.names = tuple(names)
        self.holder = replica_id()
        self.ttl, self.every = ttl, every
        self._until: dict[str, float] = {}  # name -> when our hold ends (monotonic clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def held(self, name: str) -> bool:
        """Whether this process holds the lease now (and may run its loop)."""
        return self._until.get(name, 0.0) > time.monotonic()

    def start(self) -> None:
        """Take what is free now, then keep renewing in a thread."""
        self.tick()
        self._thread = threading.Thread(target=self._loop, name="leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and hand every lease back at once (a graceful stop fails over fast)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._until.clear()
        try:
            self.store.db.execute("delete from leases where holder = ?", [self.holder])
        except DatabaseUnavailable as e:
            log.warning("leases not handed back (they expire in %g s): %s", self.ttl, e.message)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.tick()
            except Exception:  # the lease keeper must survive anything
                log.exception("renewing leases failed")

    def tick(self) -> None:
        """Renew what we hold and take what expired, one statement per lease."""
        started, now = time.monotonic(), time.time()
        won: dict[str, float] = {}
        try:
            with self.store.lock:
                for name in (*self.names, REPLICA + self.holder):
                    if self._take(name, now):
                        won[name] = started + self.ttl
        except DatabaseUnavailable as e:
            log.warning("cannot renew leases: %s", e.message)  # ours run out by themselves
            return
        for name in self.names:
            had, has = self.held(name), name in won
            if has != had:
                log.info("lease %s %s (replica %s)", name, "taken" if has else "lost", self.holder)
        self._until = won

    def _take(self, name: str, now: float) -> bool:
        return (
            self.store.db.execute(
                "insert into leases (name, holder, expires_at, since) values (?, ?, ?, ?) "
                "on conflict (name) do update set holder = excluded.holder, "
                "expires_at = excluded.expires_at, since = case when leases.holder = "
                "excluded.holder then leases.since else excluded.since end "
                "where leases.holder = excluded.holder or leases.expires_at < ?",
                [name, self.holder, now + self.ttl, now, now],
            ).rowcount
            > 0
        )

    def holders(self) -> dict[str, dict[str, Any]]:
        """Every loop's lease as the database has it: holder, held for, expires in (s)."""
        now = time.time()
        rows = self.store.db.execute(
            "select name, holder, expires_at, since from leases where name not like 'replica:%'"
        ).fetchall()
        return {
            n: {
                "holder": h,
                "mine": h == self.holder,
                "live": e > now,
                "held_s": round(now - s, 1),
                "expires_in_s": round(e - now, 1),
            }
            for n, h, e, s in rows
        }

    def live_replicas(self) -> set[str]:
        """The ids of replicas whose own lease has not expired."""
        rows = self.store.db.execute(
            "select name from leases where name like 'replica:%' and expires_at >= ?",
            [time.time()],
        ).fetchall()
        return {str(r[0])[len(REPLICA) :] for r in rows}
