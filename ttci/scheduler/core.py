"""The scheduler's shared state and host side: its store, host pool, users, and the VM rows
every other part reads (env_views, env_create, env_exec and service build on this class)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
from pathlib import Path
from typing import Any

from ttci import __version__
from ttci.infra.db import now
from ttci.infra.sql import DatabaseUnavailable, NotFoundError, SqlStore
from ttci.infra.sql_leases import Leases
from ttci.model.errors import TTError
from ttci.model.resources import Resources
from ttci.scheduler.hostd_client import HostdClient
from ttci.scheduler.hosts import HostPool
from ttci.scheduler.planning.admission import Waiting
from ttci.scheduler.schema import MIGRATIONS
from ttci.scheduler.users import User, Users
from ttci.wire.api import API_VERSION
from ttci.wire.envs import EnvEvent
from ttci.wire.queue import QueueInfo
from ttci.wire.warm import image_warmth

__all__ = ["LEASES", "PARALLEL_CREATES", "EnvBusy", "EnvExists", "EnvNotFound", "SchedulerCore"]

log = logging.getLogger("ttci.scheduler")
PARALLEL_CREATES = 8
LEASES = ("reaper", "dispatcher", "hosts")  # the loops that run on one replica at a time


class EnvNotFound(TTError):
    """No such ENV (or not yours)."""


class EnvExists(TTError):
    """An ENV of that name exists."""


class EnvBusy(TTError):
    """The ENV is in the middle of being created."""


class SchedulerCore:
    def __init__(
        self,
        state_dir: Path,
        hosts: dict[str, tuple[str, str]],
        *,
        admin_token: str = "",
        join_token: str = "",
        host_timeout: float = 15.0,
        database: str = "",
        password_file: Path | None = None,
    ) -> None:
        """hosts: host id -> (url, token), the static --server-set (may be empty when hosts
        register themselves with join_token). database: a SQLite path or a postgresql:// URL
        (default: state_dir/scheduler.db)."""
        self.store = SqlStore(
            database or state_dir / "scheduler.db",
            MIGRATIONS,
            password_file=password_file,
            namespace="ttci_scheduler",
        )
        self.pool = HostPool(
            self.store,
            hosts,
            join_token=join_token,
            timeout=host_timeout,
            on_down=self._host_down,
            on_up=self._host_up,
        )
        self.users = Users(self.store, admin_token)
        # The background loops run on one replica at a time (leases; started by serve).
        self.leases = Leases(self.store, LEASES)
        self._stop = threading.Event()
        # The admission queue (env_queue): the dispatcher's wake-up call, the last decision's
        # waiting requests, and the progress streams that watch an ENV.
        self._dispatch_wake = threading.Event()
        self._waiting: dict[str, Waiting] = {}
        self._decided_at = 0.0
        self._watch_lock = threading.Lock()
        # A stream also polls its ENV's row: with replicas, another one may grant and boot it
        # (its events stay there), so the poll is what tells this one's watchers.
        self._watch_poll_s = 1.0 if self.store.dialect == "sqlite" else 0.25
        # None in a watcher's queue: a poke (another replica changed the ENV: look at its row).
        self._watchers: dict[str, list[queue.Queue[EnvEvent | None]]] = {}

    def _placing(self) -> contextlib.AbstractContextManager[None]:
        """Placement and the admission queue, one at a time across every replica (a mutex
        of the database); taken before any `with self.store.lock:` of the thread."""
        return self.store.mutex("place")

    def queue_info(self, name: str) -> QueueInfo | None:
        """Where a queued ENV stands (env_queue answers; None: not waiting)."""
        return None

    def wake_dispatch(self) -> None:
        """Capacity may have freed (or a request arrived): the dispatcher looks at once."""
        self._dispatch_wake.set()

    # -- hosts and images --------------------------------------------------------------------
    def refresh_hosts(self) -> list[dict[str, Any]]:
        """Poll the static hosts now; registered ones report by heartbeat."""
        self.pool.poll_static()
        self.pool.check_timeouts()
        return self.hosts()

    def hosts(self) -> list[dict[str, Any]]:
        return self.pool.public_all()

    def status(self, user: User) -> dict[str, Any]:
        """GET /v1/status: versions, who asks, and counts() for them."""
        head = {"version": __version__, "api": API_VERSION, "user": user.name, "admin": user.admin}
        return {**head, **self.counts(user)}

    def counts(self, user: User) -> dict[str, int]:
        """Hosts, ENVs and VMs (the user's own, or all for an admin) by SQL, for /v1/status."""
        where, args = ("", []) if user.admin else (" where owner = ?", [user.name])
        sub = f"select name from envs{where}"  # noqa: S608 (where is ours)
        counts = (
            "select count(*) from hosts where state = 'up'",
            "select count(*) from hosts",
            f"select count(*) from ({sub}) e",  # noqa: S608
            f"select count(*) from vms where env in ({sub})"  # noqa: S608
            if where
            else "select count(*) from vms",
        )
        sql = "select " + ", ".join(f"({c})" for c in counts)
        row = self.store.db.execute(sql, args * 2).fetchone()
        hosts_up, hosts, envs, vms = (int(n) for n in row)
        return {"hosts_up": hosts_up, "hosts": hosts, "envs": envs, "vms": vms}

    def set_drain(self, host_id: str, drained: bool) -> dict[str, Any]:
        """A drained host keeps its VMs but gets no new ones."""
        out = self.pool.set_drain(host_id, drained)
        self.wake_dispatch()
        return out

    def images(self) -> list[dict[str, Any]]:
        """The union of all up hosts' images, with the hosts that have each and whether its VMs
        start warm there (ttci.wire.warm)."""
        merged: dict[str, dict[str, Any]] = {}
        warm: dict[str, list[tuple[str, Any]]] = {}
        for h in self.hosts():
            if h["state"] != "up":
                continue
            for img in h.get("images", []):
                entry = merged.setdefault(img["name"], {**img, "hosts": []})
                entry["hosts"].append(h["id"])
                warm.setdefault(img["name"], []).append((h["id"], h.get("warm")))
        return [{**merged[k], "warm": image_warmth(merged[k], warm[k])} for k in sorted(merged)]

    def _client(self, host_id: str) -> HostdClient:
        return self.pool.client(host_id)

    def _host_down(self, host_id: str, why: str) -> None:
        """Every VM on a host that stopped answering is lost; its ENV says so."""
        with self.store.lock:
            self.store.db.execute(
                "update vms set state = 'lost', error = ? where host = ? and state = 'running'",
                [f"host {host_id} stopped answering: {why}", host_id],
            )

    def _host_up(self, host_id: str) -> None:
        """A host came back: its VMs that still run there are running again."""
        try:
            there = {v["id"] for v in self._client(host_id).vms() if v.get("state") == "running"}
        except TTError as e:
            log.warning("host %s is back but its VMs could not be listed: %s", host_id, e)
            return
        try:
            with self.store.lock:
                for v in self.store.db.table("vms").rows_where(
                    "host = ? and state = 'lost'", [host_id]
                ):
                    if v["id"] in there:
                        self.store.db.table("vms").update(
                            v["id"], {"state": "running", "error": ""}
                        )
                        log.info("VM %s on %s is back", v["name"], host_id)
        except DatabaseUnavailable as e:  # its next heartbeat tries again
            log.warning("host %s is back but its VMs could not be updated: %s", host_id, e)
            return
        self.wake_dispatch()

    def _committed(self) -> dict[str, Resources]:
        """What the scheduler has put on each host (VMs not yet deleted)."""
        with self.store.lock:
            rows = self.store.db.execute(
                "select host, sum(cpus), sum(memory_mib), sum(disk_gib) from vms "
                "where state in ('creating', 'running', 'lost') group by host"
            ).fetchall()
        return {h: Resources(float(c or 0), int(m or 0), int(d or 0)) for h, c, m, d in rows}

    # -- ENV and VM rows ---------------------------------------------------------------------
    def _env_row(self, name: str, user: User) -> dict[str, Any]:
        rows = self.store.db.table("envs").rows_where("name = ?", [name])
        if not rows or (rows[0]["owner"] != user.name and not user.admin):
            raise EnvNotFound(f"no ENV named {name!r}", hint="see `tt env list`")
        return rows[0]

    def _vm_rows(self, env: str) -> list[dict[str, Any]]:
        return self.store.db.table("vms").rows_where("env = ?", [env], order_by="name")

    def _set_vm(self, vm_id: str, **fields: Any) -> None:
        with self.store.lock, contextlib.suppress(NotFoundError):
            self.store.db.table("vms").update(vm_id, fields)

    def _mark_failed(self, env: str, why: str) -> None:
        """Left for the reaper: it deletes what remains as soon as the hosts let it."""
        with self.store.lock:
            self.store.db.table("envs").update(
                env, {"state": "failed", "error": why, "expires_at": now()}
            )

    def _drop_vms(self, env: str, commit_cache: bool = False) -> list[str]:
        """Delete the ENV's VMs on their hosts; forget those that are gone. commit_cache: the
        job succeeded, its VMs' cache clones are committed.

        Returns:
            What could not be deleted ("name: why"), still recorded for a later try.
        """
        problems: list[str] = []

        def drop(v: dict[str, Any]) -> None:
            try:
                self._client(v["host"]).delete_vm(v["id"], commit_cache)
            except TTError as e:
                problems.append(f"{v['name']}: {e.message}")
                return
            with self.store.lock:
                self.store.db.table("vms").delete_where("id = ?", [v["id"]])

        rows = self._vm_rows(env)
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            list(pool.map(drop, rows))
        self.pool.refresh({v["host"] for v in rows})
        self.wake_dispatch()
        return problems
