"""Creating an ENV: place every VM, record it, boot it on its host; all or nothing."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from ttci.infra.db import now
from ttci.model.cache import CacheScope
from ttci.model.errors import BadInput, TTError
from ttci.model.naming import ImageName
from ttci.model.resources import Resources
from ttci.scheduler import history
from ttci.scheduler.core import PARALLEL_CREATES, EnvExists
from ttci.scheduler.env_views import EnvViews
from ttci.scheduler.hostd_client import HostUnreachable
from ttci.scheduler.planning.admission import project_key
from ttci.scheduler.planning.envspec import vm_names
from ttci.scheduler.planning.placement import Ask, NoPlacement, place
from ttci.scheduler.users import User, check_env_name
from ttci.wire.envs import EnvRequest, VMRequest, VmUp

__all__ = ["EnvCreation", "request_from_json", "request_json"]

log = logging.getLogger("ttci.scheduler")


class EnvCreation(EnvViews):
    def plan_env(self, req: EnvRequest) -> dict[str, Any]:
        """Where the ENV's VMs would go now (nothing is created): `tt env add --dry-run`."""
        asks = self._asks(req)
        with self._placing():
            placement = place(asks, self.pool.views(self._committed()))
        per_host: dict[str, int] = {}
        for hid in placement.values():
            per_host[hid] = per_host.get(hid, 0) + 1
        return {"name": req.name, "vm_count": len(asks), "hosts": per_host}

    def _asks(self, req: EnvRequest, user: User | None = None) -> list[Ask]:
        """The VMs to place (with the scope id of the ENV's cache, preferred where it is)."""
        self.pool.check_timeouts()
        hosts = self.hosts()
        if not any(h["state"] == "up" for h in hosts):
            hosts = self.refresh_hosts()
        wanted = self._wanted(req, hosts)
        sizes = {i["name"]: i.get("disk_gib", 4) for h in hosts for i in h.get("images", [])}
        cache = ""
        if req.cache and user:
            scope = CacheScope(user.name, project_key(req.origin, user.name), req.cache.key)
            cache = scope.scope_id
        return [
            Ask(
                key=name,
                image=image,
                arch=ImageName.parse(image).arch.value,
                need=Resources(req.cpus, req.memory_mib, req.disk_gib or sizes[image]),
                cache=cache,
            )
            for name, image in wanted
        ]

    @staticmethod
    def _wanted(req: EnvRequest, hosts: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """The ENV's VMs (name, image) from the images of the hosts that are up; if none of
        those matches, from those of hosts that missed their heartbeats too: such a host may
        come back (the queue waits for it), so a job asked for while the only host with its
        image is briefly down waits instead of failing as matching no image."""
        up = sorted({i["name"] for h in hosts if h["state"] == "up" for i in h.get("images", [])})
        try:
            return vm_names(req, up)
        except BadInput:
            known = {i["name"] for h in hosts if h["state"] == "down" for i in h.get("images", [])}
            if not known - set(up):
                raise
            return vm_names(req, sorted(known | set(up)))

    def boot_env(
        self, req: EnvRequest, user: User, progress: Callable[[VmUp], None] | None = None
    ) -> dict[str, Any]:
        """Boot every VM of a granted ENV (its VM rows are placed and recorded); all or nothing:
        if any VM fails, the ones made are deleted again and TTError says why."""
        vm_rows = self._vm_rows(req.name)
        failures: list[str] = []

        def boot(v: dict[str, Any]) -> None:
            try:
                self._boot_vm(req, user, v, progress)
            except Exception as e:  # any failure takes the whole ENV back, never a 500
                msg = e.message if isinstance(e, TTError) else repr(e)
                self._set_vm(v["id"], state="failed", error=msg)
                failures.append(f"{v['name']} on {v['host']}: {msg}")

        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            list(pool.map(boot, vm_rows))
        self.pool.refresh({v["host"] for v in vm_rows})
        if failures:
            self._take_back(req.name, failures)
        with self.store.lock:
            self.store.db.table("envs").update(req.name, {"state": "ready"})
        history.env_ready(self.store, req.name)
        return self.show_env(req.name, user)

    def _insert_env(self, req: EnvRequest, user: User, project: str) -> None:
        """Write the ENV (state queued) before anything is made. The caller holds the lock.
        CI names (gl-N, gh-N-N) are only for their service's account (users.check_env_name)."""
        check_env_name(user, req.name)
        if self.store.db.table("envs").count_where("name = ?", [req.name]):
            raise EnvExists(
                f"an ENV named {req.name!r} exists",
                hint="pick another name or `tt env del` it first",
            )
        created = now()
        self.store.db.table("envs").insert(
            {
                "name": req.name,
                "owner": user.name,
                "os_prefix": req.os_prefix,
                "state": "queued",
                "created_at": created,
                "expires_at": _after(req.life_s),
                "request": json.dumps(request_json(req)),
                "error": "",
                "origin": json.dumps(req.origin),
                "project": project,
            }
        )

    def _insert_vms(
        self, req: EnvRequest, asks: list[Ask], placement: dict[str, str], wait_s: float
    ) -> None:
        """A granted ENV: its VMs placed and recorded (state creating), its lifetime starting
        now. The caller holds the store's lock."""
        created = now()
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
        self.store.db.table("envs").update(
            req.name,
            {
                "state": "creating",
                "expires_at": _after(req.life_s),
                "wait_s": round(wait_s, 3),
                "worker": self.leases.holder,  # the replica that boots it (core.recover)
            },
        )

    def _create_on_host(self, req: EnvRequest, user: User, v: dict[str, Any]) -> dict[str, Any]:
        """Create the VM where it was placed; a host that vanished meanwhile is marked
        down and the VM is placed once more on the rest of the pool."""
        body = VMRequest(
            id=v["id"],
            env=req.name,
            name=v["name"],
            owner=user.name,
            image=v["image"],
            cpus=v["cpus"],
            memory_mib=v["memory_mib"],
            disk_gib=v["disk_gib"],
            deny_outgoing=req.deny_outgoing,
            ports=req.vm_ports,
            allow_egress=req.allow_egress,
            egress_audit=req.egress_audit,
            cold=req.cold,
            cache=req.cache,
            cache_project=project_key(req.origin, user.name) if req.cache else "",
        )
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
            with self._placing():
                try:
                    again = place([ask], self.pool.views(self._committed()))[v["name"]]
                except NoPlacement as np:
                    raise TTError(f"{e.message}; and no other host can take it: {np}") from e
                self._set_vm(v["id"], host=again)
            log.warning("VM %s: host %s vanished, retrying on %s", v["name"], v["host"], again)
            v["host"] = again
            return self._client(again).create_vm(body)

    def _boot_vm(
        self,
        req: EnvRequest,
        user: User,
        v: dict[str, Any],
        progress: Callable[[VmUp], None] | None,
    ) -> None:
        r = self._create_on_host(req, user, v)
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
                VmUp(v["name"], v["host"], v["image"], r.get("boot_s", 0.0), r.get("accel", ""))
            )

    def _take_back(self, env: str, failures: list[str]) -> None:
        """A VM failed: delete the ones made (all or nothing) and raise why."""
        kept = self._drop_vms(env)
        if kept:
            self._mark_failed(env, "; ".join(kept))
            raise TTError(
                f"ENV {env} could not be created: {'; '.join(failures[:5])}; and "
                f"{len(kept)} VM(s) could not be deleted yet: {'; '.join(kept[:3])}",
                hint="the reaper retries; or run `tt env del` when the host is back",
            )
        with self.store.lock:
            self.store.db.table("envs").delete(env)
        raise TTError(
            f"ENV {env} could not be created (nothing was kept): " + "; ".join(failures[:5]),
            hint="see the reasons; `tt image list` shows what exists",
        )


def _after(seconds: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")


def request_json(req: EnvRequest) -> dict[str, Any]:
    """The request as the ENV's row keeps it (a queued ENV is booted from it after a restart):
    as it came over the wire."""
    return req.to_dict()


def request_from_json(d: dict[str, Any]) -> EnvRequest:
    if "life_s" in d:  # kept by a scheduler of before the wire shapes: the dataclass's fields
        d = {("life_time" if k == "life_s" else k): v for k, v in d.items()}
    return EnvRequest.from_dict(d)
