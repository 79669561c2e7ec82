"""The scheduler's logic: hosts, the image catalogue, ENVs and their VMs, lifetimes.

State lives in SQLite (sqlite-utils, named migrations), so a restarted scheduler loses nothing.
An ENV is created all or nothing: if any VM fails, the ones already made are deleted again.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils
import sqlite_utils.db

from ttci.infra.db import Store, now
from ttci.model.errors import BadInput, TTError
from ttci.model.naming import ImageName
from ttci.model.resources import Resources
from ttci.scheduler import history
from ttci.scheduler.hostd_client import HostdClient, HostdError, HostUnreachable
from ttci.scheduler.hosts import HostPool
from ttci.scheduler.planning.envspec import EnvRequest
from ttci.scheduler.planning.placement import Ask, NoPlacement, place
from ttci.scheduler.users import User, Users

__all__ = ["PARALLEL_CREATES", "EnvBusy", "EnvExists", "EnvNotFound", "Scheduler"]

log = logging.getLogger("ttci.scheduler")
PARALLEL_CREATES = 8


class EnvNotFound(TTError):
    """No such ENV (or not yours)."""


class EnvExists(TTError):
    """An ENV of that name exists."""


class EnvBusy(TTError):
    """The ENV is in the middle of being created."""


def _migrations() -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
    def base(db: sqlite_utils.Database) -> None:
        db.table("hosts").create(
            {"id": str, "url": str, "state": str, "last_seen": str, "info": str}, pk="id"
        )
        db.table("envs").create(
            {
                "name": str,
                "owner": str,
                "os_prefix": str,
                "state": str,
                "created_at": str,
                "expires_at": str,
                "request": str,
                "error": str,
            },
            pk="name",
        )
        db.table("vms").create(
            {
                "id": str,
                "env": str,
                "name": str,
                "host": str,
                "image": str,
                "arch": str,
                "cpus": float,
                "memory_mib": int,
                "disk_gib": int,
                "state": str,
                "error": str,
                "boot_s": float,
                "accel": str,
                "created_at": str,
            },
            pk="id",
        )
        db.table("vms").create_index(["env"])

    def guest_boot(db: sqlite_utils.Database) -> None:
        db.table("vms").add_column("guest_boot_s", float, not_null_default=0.0)

    def origin(db: sqlite_utils.Database) -> None:
        db.table("envs").add_column("origin", str, not_null_default='{"kind": "cli"}')

    def host_pool(db: sqlite_utils.Database) -> None:
        hosts = db.table("hosts")
        hosts.add_column("kind", str, not_null_default="static")
        hosts.add_column("token", str, not_null_default="")
        hosts.add_column("drained", int, not_null_default=0)
        hosts.add_column("error", str, not_null_default="")
        hosts.add_column("seen_mono", float, not_null_default=0.0)

    def users(db: sqlite_utils.Database) -> None:
        db.table("users").create(
            {"name": str, "admin": int, "token_sha256": str, "created_at": str}, pk="name"
        )
        db.table("users").create_index(["token_sha256"], unique=True)

    def vm_net(db: sqlite_utils.Database) -> None:
        db.table("vms").add_column("net", str, not_null_default="{}")

    def vm_order(db: sqlite_utils.Database) -> None:
        db.table("vms").create_index(["env", "name"])  # pages of huge ENVs without sorting
        db.table("vms").create_index(["host", "state"])
        db.table("vms").create_index(["env", "state"])  # per-ENV counts from the index alone

    return [
        ("0001_base", base),
        ("0002_guest_boot_s", guest_boot),
        ("0003_origin", origin),
        ("0004_host_pool", host_pool),
        ("0005_users", users),
        (history.MIGRATION_NAME, history.migrate),
        ("0006_vm_net", vm_net),
        ("0007_vm_order", vm_order),
    ]


class Scheduler:
    def __init__(
        self,
        state_dir: Path,
        hosts: dict[str, tuple[str, str]],
        *,
        admin_token: str = "",
        join_token: str = "",
        host_timeout: float = 15.0,
    ) -> None:
        """hosts: host id -> (url, token), the static --server-set (may be empty when hosts
        register themselves with join_token)."""
        self.store = Store(state_dir / "scheduler.db", _migrations())
        self.pool = HostPool(
            self.store,
            hosts,
            join_token=join_token,
            timeout=host_timeout,
            on_down=self._host_down,
            on_up=self._host_up,
        )
        self.users = Users(self.store, admin_token)
        self._stop = threading.Event()
        self._place_lock = threading.Lock()

    # -- hosts and images --------------------------------------------------------------------
    def refresh_hosts(self) -> list[dict[str, Any]]:
        """Poll the static hosts now; registered ones report by heartbeat."""
        self.pool.poll_static()
        self.pool.check_timeouts()
        return self.hosts()

    def hosts(self) -> list[dict[str, Any]]:
        return self.pool.public_all()

    def counts(self, user: User) -> dict[str, int]:
        """Hosts, ENVs and VMs (the user's own, or all for an admin) by SQL, for /v1/status."""
        where, args = ("", []) if user.admin else (" where owner = ?", [user.name])
        with self.store.lock:
            db = self.store.db
            hosts_up = db.execute("select count(*) from hosts where state = 'up'").fetchone()[0]
            hosts = db.execute("select count(*) from hosts").fetchone()[0]
            envs = db.execute(f"select count(*) from envs{where}", args).fetchone()[0]  # noqa: S608
            vms = db.execute(
                f"select count(*) from vms where env in (select name from envs{where})",  # noqa: S608
                args,
            ).fetchone()[0]
        return {"hosts_up": hosts_up, "hosts": hosts, "envs": envs, "vms": vms}

    def set_drain(self, host_id: str, drained: bool) -> dict[str, Any]:
        """A drained host keeps its VMs but gets no new ones."""
        return self.pool.set_drain(host_id, drained)

    def images(self) -> list[dict[str, Any]]:
        """The union of all up hosts' images, with the hosts that have each."""
        merged: dict[str, dict[str, Any]] = {}
        for h in self.hosts():
            if h["state"] != "up":
                continue
            for img in h.get("images", []):
                entry = merged.setdefault(img["name"], {**img, "hosts": []})
                entry["hosts"].append(h["id"])
        return [merged[k] for k in sorted(merged)]

    def _client(self, host_id: str) -> HostdClient:
        return self.pool.client(host_id)

    def _host_down(self, host_id: str, why: str) -> None:
        """Every VM on a host that stopped answering is lost; its ENV says so."""
        with self.store.lock:
            self.store.db.execute(
                "update vms set state = 'lost', error = ? where host = ? and state = 'running'",
                [f"host {host_id} stopped answering: {why}", host_id],
            )
            self.store.db.conn.commit()

    def _host_up(self, host_id: str) -> None:
        """A host came back: its VMs that still run there are running again."""
        try:
            there = {v["id"] for v in self._client(host_id).vms() if v.get("state") == "running"}
        except TTError as e:
            log.warning("host %s is back but its VMs could not be listed: %s", host_id, e)
            return
        with self.store.lock:
            for v in self.store.db.table("vms").rows_where(
                "host = ? and state = 'lost'", [host_id]
            ):
                if v["id"] in there:
                    self.store.db.table("vms").update(v["id"], {"state": "running", "error": ""})
                    log.info("VM %s on %s is back", v["name"], host_id)

    def _committed(self) -> dict[str, Resources]:
        """What the scheduler has put on each host (VMs not yet deleted)."""
        with self.store.lock:
            rows = self.store.db.execute(
                "select host, sum(cpus), sum(memory_mib), sum(disk_gib) from vms "
                "where state in ('creating', 'running', 'lost') group by host"
            ).fetchall()
        return {h: Resources(float(c or 0), int(m or 0), int(d or 0)) for h, c, m, d in rows}

    # -- ENVs --------------------------------------------------------------------------------
    def _env_row(self, name: str, user: User) -> dict[str, Any]:
        with self.store.lock:
            rows = list(self.store.db.table("envs").rows_where("name = ?", [name]))
        if not rows or (rows[0]["owner"] != user.name and not user.admin):
            raise EnvNotFound(f"no ENV named {name!r}", hint="see `tt env list`")
        return rows[0]

    def _vm_rows(self, env: str) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("vms").rows_where("env = ?", [env], order_by="name"))

    VM_KEYS = (
        "name",
        "image",
        "arch",
        "host",
        "state",
        "cpus",
        "memory_mib",
        "disk_gib",
        "accel",
        "boot_s",
        "guest_boot_s",
        "error",
    )

    def env_json(self, row: dict[str, Any], vms: bool = True) -> dict[str, Any]:
        out = {
            k: row[k]
            for k in ("name", "owner", "os_prefix", "state", "created_at", "expires_at", "error")
        }
        out["origin"] = json.loads(row.get("origin") or '{"kind": "cli"}')
        with self.store.lock:
            counts = dict(
                self.store.db.execute(
                    "select state, count(*) from vms where env = ? group by state", [row["name"]]
                ).fetchall()
            )
        out["vm_count"] = sum(counts.values())
        out["lost"] = counts.get("lost", 0)
        if vms:
            out["vms"] = [self._vm_json(v) for v in self._vm_rows(row["name"])]
        return out

    def _vm_json(self, v: dict[str, Any]) -> dict[str, Any]:
        net = json.loads(v.get("net") or "{}")
        return {
            **{k: v[k] for k in self.VM_KEYS},
            "ip": net.get("ip", ""),
            "ports": net.get("ports", []),
        }

    def page_vms(self, name: str, user: User, offset: int, limit: int) -> dict[str, Any]:
        """One page of a (possibly huge) ENV's VMs, in name order."""
        self._env_row(name, user)
        with self.store.lock:
            rows = list(
                self.store.db.table("vms").rows_where(
                    "env = ?", [name], order_by="name", offset=offset, limit=limit
                )
            )
            total = self.store.db.table("vms").count_where("env = ?", [name])
        nxt = offset + len(rows)
        return {
            "env": name,
            "total": total,
            "offset": offset,
            "vms": [self._vm_json(v) for v in rows],
            "next_offset": nxt if nxt < total else None,
        }

    def iter_vms(self, name: str, user: User, batch: int = 2000) -> Iterator[dict[str, Any]]:
        """Every VM of the ENV, read in batches (for NDJSON streams)."""
        offset = 0
        while True:
            page = self.page_vms(name, user, offset, batch)
            yield from page["vms"]
            if page["next_offset"] is None:
                return
            offset = page["next_offset"]

    def list_envs(self, user: User, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self.store.lock:
            where, args = ("1=1", []) if user.admin else ("owner = ?", [user.name])
            rows = list(
                self.store.db.table("envs").rows_where(
                    where, args, order_by="created_at, name", offset=offset, limit=limit
                )
            )
        return [self.env_json(r, vms=False) for r in rows]

    def show_env(self, name: str, user: User, vms: bool = True) -> dict[str, Any]:
        return self.env_json(self._env_row(name, user), vms=vms)

    def plan_env(self, req: EnvRequest) -> dict[str, Any]:
        """Where the ENV's VMs would go now (nothing is created): `tt env add --dry-run`."""
        asks = self._asks(req)
        with self._place_lock:
            placement = place(asks, self.pool.views(self._committed()))
        per_host: dict[str, int] = {}
        for hid in placement.values():
            per_host[hid] = per_host.get(hid, 0) + 1
        return {"name": req.name, "vm_count": len(asks), "hosts": per_host}

    def _asks(self, req: EnvRequest) -> list[Ask]:
        self.pool.check_timeouts()
        hosts = self.hosts()
        if not any(h["state"] == "up" for h in hosts):
            hosts = self.refresh_hosts()
        images = sorted(
            {i["name"] for h in hosts if h["state"] == "up" for i in h.get("images", [])}
        )
        wanted = req.vms(images)
        sizes = {i["name"]: i.get("disk_gib", 4) for h in hosts for i in h.get("images", [])}
        return [
            Ask(
                key=name,
                image=image,
                arch=ImageName.parse(image).arch.value,
                need=Resources(req.cpus, req.memory_mib, req.disk_gib or sizes[image]),
            )
            for name, image in wanted
        ]

    def create_env(
        self, req: EnvRequest, user: User, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Place and boot every VM of the ENV; all or nothing."""
        asks = self._asks(req)
        created = now()
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=req.life_s)).isoformat(
            timespec="seconds"
        )
        with self._place_lock, self.store.lock:
            placement = place(asks, self.pool.views(self._committed()))
            if self.store.db.table("envs").count_where("name = ?", [req.name]):
                raise EnvExists(
                    f"an ENV named {req.name!r} exists",
                    hint="pick another name or `tt env del` it first",
                )
            self.store.db.table("envs").insert(
                {
                    "name": req.name,
                    "owner": user.name,
                    "os_prefix": req.os_prefix,
                    "state": "creating",
                    "created_at": created,
                    "expires_at": expires,
                    "request": json.dumps(req.__dict__),
                    "error": "",
                    "origin": json.dumps(req.origin),
                }
            )
            self.store.db.table("vms").insert_all(
                [
                    {
                        "id": uuid.uuid4().hex[:12],
                        "env": req.name,
                        "name": a.key,
                        "host": placement[a.key],
                        "image": a.image,
                        "arch": a.arch,
                        "cpus": a.need.cpus,
                        "memory_mib": a.need.memory_mib,
                        "disk_gib": a.need.disk_gib,
                        "state": "creating",
                        "error": "",
                        "boot_s": 0.0,
                        "accel": "",
                        "created_at": created,
                    }
                    for a in asks
                ]
            )
        vm_rows = self._vm_rows(req.name)
        failures: list[str] = []

        def create_on_host(v: dict[str, Any]) -> dict[str, Any]:
            """Create the VM where it was placed; a host that vanished meanwhile is marked
            down and the VM is placed once more on the rest of the pool."""
            body = {
                "id": v["id"],
                "env": req.name,
                "name": v["name"],
                "owner": user.name,
                "image": v["image"],
                "cpus": v["cpus"],
                "memory_mib": v["memory_mib"],
                "disk_gib": v["disk_gib"],
                "deny_outgoing": req.deny_outgoing,
                "ports": req.vm_ports,
            }
            try:
                return self._client(v["host"]).create_vm(body)
            except HostUnreachable as e:
                self.pool.mark_unreachable(v["host"], e.message)
                ask = Ask(
                    v["name"],
                    v["image"],
                    v["arch"],
                    Resources(v["cpus"], v["memory_mib"], v["disk_gib"]),
                )
                with self._place_lock:
                    try:
                        again = place([ask], self.pool.views(self._committed()))[v["name"]]
                    except NoPlacement as np:
                        raise TTError(f"{e.message}; and no other host can take it: {np}") from e
                    self._set_vm(v["id"], host=again)
                log.warning("VM %s: host %s vanished, retrying on %s", v["name"], v["host"], again)
                v["host"] = again
                return self._client(again).create_vm(body)

        def boot(v: dict[str, Any]) -> None:
            try:
                r = create_on_host(v)
                self._set_vm(
                    v["id"],
                    state="running",
                    boot_s=r.get("boot_s", 0.0),
                    accel=r.get("accel", ""),
                    guest_boot_s=r.get("guest_boot_s", 0.0),
                    net=json.dumps({"ip": r.get("ip", ""), "ports": r.get("ports", [])}),
                )
                if progress:
                    progress(
                        {
                            "vm": v["name"],
                            "host": v["host"],
                            "image": v["image"],
                            "boot_s": r.get("boot_s", 0.0),
                            "accel": r.get("accel", ""),
                        }
                    )
            except Exception as e:  # any failure takes the whole ENV back, never a 500
                msg = e.message if isinstance(e, TTError) else repr(e)
                self._set_vm(v["id"], state="failed", error=msg)
                failures.append(f"{v['name']} on {v['host']}: {msg}")

        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            list(pool.map(boot, vm_rows))
        self.pool.refresh({v["host"] for v in vm_rows})
        if failures:
            kept = self._drop_vms(req.name)
            if kept:
                self._mark_failed(req.name, "; ".join(kept))
                raise TTError(
                    f"ENV {req.name} could not be created: {'; '.join(failures[:5])}; and "
                    f"{len(kept)} VM(s) could not be deleted yet: {'; '.join(kept[:3])}",
                    hint="the reaper retries; or run `tt env del` when the host is back",
                )
            with self.store.lock:
                self.store.db.table("envs").delete(req.name)
            raise TTError(
                f"ENV {req.name} could not be created (nothing was kept): "
                + "; ".join(failures[:5]),
                hint="see the reasons; `tt image list` shows what exists",
            )
        with self.store.lock:
            self.store.db.table("envs").update(req.name, {"state": "ready"})
        history.env_ready(self.store, req.name)
        return self.show_env(req.name, user)

    def _set_vm(self, vm_id: str, **fields: Any) -> None:
        with self.store.lock, contextlib.suppress(sqlite_utils.db.NotFoundError):
            self.store.db.table("vms").update(vm_id, fields)

    def _mark_failed(self, env: str, why: str) -> None:
        """Left for the reaper: it deletes what remains as soon as the hosts let it."""
        with self.store.lock:
            self.store.db.table("envs").update(
                env, {"state": "failed", "error": why, "expires_at": now()}
            )

    def _drop_vms(self, env: str) -> list[str]:
        """Delete the ENV's VMs on their hosts; forget those that are gone.

        Returns:
            What could not be deleted ("name: why"), still recorded for a later try.
        """
        problems: list[str] = []

        def drop(v: dict[str, Any]) -> None:
            try:
                self._client(v["host"]).delete_vm(v["id"])
            except TTError as e:
                problems.append(f"{v['name']}: {e.message}")
                return
            with self.store.lock:
                self.store.db.table("vms").delete_where("id = ?", [v["id"]])

        rows = self._vm_rows(env)
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            list(pool.map(drop, rows))
        self.pool.refresh({v["host"] for v in rows})
        return problems

    def delete_env(self, name: str, user: User) -> dict[str, Any]:
        with self.store.lock:  # check and claim at once: two deletes never race
            row = self._env_row(name, user)
            if row["state"] == "creating":
                raise EnvBusy(
                    f"ENV {name} is still being created",
                    hint="wait for `tt env add` to finish, then delete it",
                )
            if row["state"] == "deleting":
                raise EnvBusy(
                    f"ENV {name} is already being deleted",
                    hint="it is gone in a moment; see `tt env list`",
                )
            self.store.db.table("envs").update(name, {"state": "deleting"})
        problems = self._drop_vms(name)
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
        """After a restart: ENVs whose creation was cut short are taken back by the reaper."""
        with self.store.lock:
            names = [
                r["name"]
                for r in self.store.db.table("envs").rows_where("state in ('creating', 'deleting')")
            ]
        for name in names:
            log.warning("ENV %s was left half-done by a restart; the reaper takes it back", name)
            self._mark_failed(name, "interrupted by a scheduler restart")

    # -- commands and files ------------------------------------------------------------------
    def run(
        self, name: str, user: User, req: dict[str, Any], only: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Run on every VM of the ENV (or those named in only) at once; events are tagged with
        the VM's name."""
        self._env_row(name, user)
        vms = self._vm_rows(name)
        if not vms:
            raise BadInput(f"ENV {name} has no VMs", hint="create it again")
        if only:
            unknown = sorted(set(only) - {v["name"] for v in vms})
            if unknown:
                raise BadInput(
                    f"ENV {name} has no VM {', '.join(unknown)}",
                    hint=f"its VMs: {', '.join(v['name'] for v in vms[:20])}",
                )
            vms = [v for v in vms if v["name"] in only]
        events: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1024)
        stop = threading.Event()

        def put(ev: dict[str, Any]) -> bool:
            while not stop.is_set():  # the client left: drop, never block
                try:
                    events.put(ev, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def one(v: dict[str, Any]) -> None:
            ended = False
            try:
                if v["state"] != "running":
                    raise TTError(f"VM is {v['state']}: {v['error'] or 'not running'}")
                for ev in self._client(v["host"]).exec(v["id"], req):
                    if ev.get("event") == "error" and ev.get("lost"):
                        self._set_vm(v["id"], state="lost", error=ev.get("message", ""))
                    ended = ended or ev.get("event") in ("exit", "error")
                    if not put({**ev, "vm": v["name"]}):
                        return  # closing the stream makes hostd cancel the command
                if not ended:
                    put(
                        {
                            "event": "error",
                            "vm": v["name"],
                            "message": "the command's output ended without a result",
                        }
                    )
            except HostUnreachable as e:
                self._set_vm(v["id"], state="lost", error=e.message)
                put({"event": "error", "vm": v["name"], "message": e.message, "lost": True})
            except Exception as e:
                msg = e.message if isinstance(e, TTError) else repr(e)
                if isinstance(e, HostdError) and e.status == 410:
                    self._set_vm(v["id"], state="lost", error=msg)
                put({"event": "error", "vm": v["name"], "message": msg})
            finally:
                put({"event": "done", "vm": v["name"]})

        for v in vms:
            threading.Thread(target=one, args=(v,), daemon=True).start()
        remaining = len(vms)
        try:
            while remaining:
                ev = events.get()
                if ev["event"] == "done":
                    remaining -= 1
                    continue
                if ev["event"] != "start":
                    yield ev
        finally:
            stop.set()

    def push(self, name: str, user: User, dest: str, tar: bytes) -> list[dict[str, Any]]:
        self._env_row(name, user)

        def one(c: HostdClient, v: dict[str, Any]) -> None:
            c.push(v["id"], dest, tar)

        return self._each_vm(name, one)

    def get(self, name: str, user: User, path: str) -> list[dict[str, Any]]:
        self._env_row(name, user)
        return self._each_vm(name, lambda c, v: base64.b64encode(c.get(v["id"], path)).decode())

    def _each_vm(
        self, env: str, fn: Callable[[HostdClient, dict[str, Any]], Any]
    ) -> list[dict[str, Any]]:
        def one(v: dict[str, Any]) -> dict[str, Any]:
            try:
                return {"vm": v["name"], "ok": True, "data": fn(self._client(v["host"]), v)}
            except TTError as e:
                return {"vm": v["name"], "ok": False, "error": e.message}

        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            return list(pool.map(one, self._vm_rows(env)))

    # -- lifetimes ---------------------------------------------------------------------------
    def reap_expired(self) -> list[str]:
        stamp = now()
        with self.store.lock:
            names = [
                r["name"]
                for r in self.store.db.table("envs").rows_where(
                    "expires_at < ? and state not in ('creating', 'deleting')", [stamp]
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
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reap_expired()
                except Exception:  # the reaper must survive anything
                    log.exception("reaper failed")

        threading.Thread(target=loop, name="reaper", daemon=True).start()

    def start_monitor(self, interval: float = 2.0) -> None:
        """Poll static hosts and notice registered hosts whose heartbeats stopped."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh_hosts()
                except Exception:  # the monitor must survive anything
                    log.exception("host monitor failed")

        threading.Thread(target=loop, name="host-monitor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
