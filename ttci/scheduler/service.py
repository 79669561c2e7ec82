"""The scheduler's logic: hosts, the image catalogue, ENVs and their VMs, lifetimes.

State lives in a database (SQLite, or PostgreSQL shared by replicas: ttci/infra/sql.py), so a
restarted scheduler loses nothing and any replica can answer any request.
An ENV is created all or nothing: if any VM fails, the ones already made are deleted again.
The class is assembled from one part per concern: core (state, hosts, rows), env_views (reads),
env_create (placement and boot), env_queue (the admission queue), env_exec (commands and
files); this module adds deletion and lifetimes (the reaper and the host monitor).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from ttci.infra.db import now
from ttci.model.errors import TTError
from ttci.scheduler import history
from ttci.scheduler.caches import Caches
from ttci.scheduler.core import EnvBusy, EnvExists, EnvNotFound
from ttci.scheduler.env_exec import EnvExec
from ttci.scheduler.env_queue import EnvQueue
from ttci.scheduler.users import User

__all__ = ["EnvBusy", "EnvExists", "EnvNotFound", "Scheduler"]

log = logging.getLogger("ttci.scheduler")


class Scheduler(EnvQueue, EnvExec, Caches):
    def delete_env(self, name: str, user: User, commit_cache: bool = False) -> dict[str, Any]:
        """commit_cache: the job succeeded; its cache clones become their caches' newest
        versions (else they are discarded)."""
        if self._env_row(name, user)["state"] == "queued" and self.cancel_queued(name, user):
            return {"name": name, "deleted": True, "was": "queued"}
        with self.store.lock:  # check and claim at once: two deletes (any replicas) never race
            row = self._env_row(name, user)
            claimed = self.store.db.execute(
                "update envs set state = 'deleting', worker = ? where name = ? "
                "and state not in ('creating', 'deleting', 'queued')",
                [self.leases.holder, name],
            ).rowcount
            if not claimed:
                _refuse_delete(name, self._env_row(name, user)["state"])
        problems = self._drop_vms(name, commit_cache)
        if problems:
            self._mark_failed(name, "; ".join(problems))
            raise TTError(
                f"ENV {name}: some VMs could not be deleted: {'; '.join(problems)}",
                hint="retry `tt env del`; the reaper also retries",
            )
        with self.store.lock:
            self.store.db.table("envs").delete(name)
        history.env_deleted(self.store, name)
        log.info("ENV %s deleted", name)
        return {"name": row["name"], "deleted": True}

    def extend_env(self, name: str, user: User, life_s: int) -> dict[str, Any]:
        """Give a ready ENV life_s more seconds from now (never shortens it)."""
        row = self._env_row(name, user)
        if row["state"] != "ready":
            raise EnvBusy(f"ENV {name} is {row['state']}", hint="only a ready ENV can be extended")
        new = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=life_s)).isoformat(timespec="seconds")
        with self.store.lock:
            self.store.db.table("envs").update(name, {"expires_at": max(new, row["expires_at"])})
        log.info("ENV %s extended to %s", name, max(new, row["expires_at"]))
        return self.show_env(name, user)

    def recover(self) -> None:
        """ENVs whose creation or deletion was cut short (their replica died, or this
        scheduler restarted) are taken back by the reaper; those of live replicas are left."""
        alive = self.leases.live_replicas() | {self.leases.holder}
        with self.store.lock:
            rows = self.store.db.table("envs").rows_where(
                "state in ('creating', 'deleting')", select="name, worker"
            )
        for r in rows:
            if r["worker"] in alive:
                continue
            log.warning(
                "ENV %s was left half-done by a stopped scheduler; the reaper takes it back",
                r["name"],
            )
            self._mark_failed(
                r["name"], "interrupted: the scheduler creating or deleting it stopped"
            )

    # -- lifetimes ---------------------------------------------------------------------------
    def reap_expired(self) -> list[str]:
        stamp = now()
        with self.store.lock:
            names = [
                r["name"]
                for r in self.store.db.table("envs").rows_where(
                    "expires_at < ? and state not in ('queued', 'creating', 'deleting')", [stamp]
                )
            ]
        done = []
        for name in names:
            try:
                self.delete_env(name, User("reaper", admin=True))
                log.info("ENV %s expired and was deleted", name)
                done.append(name)
            except TTError as e:
                log.warning("could not reap expired ENV %s: %s", name, e)
        return done

    def start_reaper(self, interval: float = 5.0) -> None:
        """Expired ENVs are deleted, and half-done ones of dead replicas taken back (by the
        replica holding the reaper lease)."""

        def once() -> None:
            self.recover()
            self.reap_expired()

        self._loop("reaper", interval, once)

    def start_monitor(self, interval: float = 2.0) -> None:
        """Poll static hosts and notice registered hosts whose heartbeats stopped."""
        self._loop("hosts", interval, self.refresh_hosts)

    def _loop(self, lease: str, interval: float, fn: Callable[[], object]) -> None:
        """Run fn every interval seconds while this replica holds the lease."""

        def loop() -> None:
            while not self._stop.wait(interval):
                if not self.leases.held(lease):
                    continue
                try:
                    fn()
                except Exception:  # the loop must survive anything
                    log.exception("%s loop failed", lease)

        threading.Thread(target=loop, name=lease, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.leases.stop()

    def close(self) -> None:
        """Stop, and close the database (its pool, for PostgreSQL)."""
        self.stop()
        self.store.close()


def _refuse_delete(name: str, state: str) -> None:
    """Why an ENV cannot be deleted now (another delete, or its creation, is under way)."""
    if state == "deleting":
        raise EnvBusy(
            f"ENV {name} is already being deleted", hint="it is gone in a moment; see `tt env list`"
        )
    raise EnvBusy(
        f"ENV {name} is still being created" if state == "creating" else f"ENV {name} is {state}",
        hint="wait for `tt env add` to finish, then delete it",
    )
