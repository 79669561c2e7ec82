"""The VMs of one host: create, exec, delete, and reconcile after a crash or restart.

Every resource (state row, work directory with overlay, socket and console log, libvirt domain)
is recorded in the host's state *before* it is made, and removed in reverse order by an ExitStack
when a creation fails half-way, by `delete`, and by `reconcile` after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import sqlite_utils
import sqlite_utils.db

from hostd.builders.domain_xml import DomainSpec
from hostd.images.catalogue import Image, scan
from hostd.net.manager import NetConfig, NetManager, VmNet
from hostd.storage.volumes import vm_volume
from hostd.vm import caching
from hostd.vm.accel import choose_accel
from hostd.vm.agent_client import AgentClient
from hostd.vm.disk import open_volumes, reconcile_volumes, vm_disk
from hostd.vm.domain import vm_domain
from hostd.vm.engine import Engine
from hostd.vm.schema import open_store
from hostd.vm.templates import WAKE_TIMEOUT_S, Templates
from hostd.vm.vm_request import check_vm_name, disk_for
from hostd.vm.warm import (
    CloneSpec,
    TemplateSpec,
    dns_servers,
    identity_for,
    restore_clone,
    vcpus_for,
    wake,
)
from ttci.infra.db import now
from ttci.model.arch import Arch
from ttci.model.errors import AgentError, BadInput, BootError, TTError
from ttci.model.resources import Resources, shortfall
from ttci.wire.agent_protocol import ExitStatus
from ttci.wire.envs import VMRequest

__all__ = [
    "BOOT_TIMEOUT_S",
    "KVM_OVERHEAD_MIB",
    "TCG_OVERHEAD_MIB",
    "HostConfig",
    "NoCapacity",
    "NotFound",
    "VMLost",
    "VMManager",
]

log = logging.getLogger("hostd.vm.manager")
TCG_OVERHEAD_MIB = 384  # TCG's code cache etc.: an idle 512 MiB guest already charges ~280 MiB
KVM_OVERHEAD_MIB = 128
BOOT_TIMEOUT_S = 120.0


class NoCapacity(TTError):
    """The request does not fit the host's free resources."""


class NotFound(TTError):
    """No such VM on this host."""


class VMLost(TTError):
    """The VM stopped (crashed, was killed) while we used it."""


@dataclass(frozen=True)
class HostConfig:
    host_id: str
    image_path: Path
    state_dir: Path
    total: Resources
    net: NetConfig = field(default_factory=NetConfig)
    warm: bool = True  # start VMs from snapshot templates where restore works
    storage: str = "qcow2"  # the disks' backend: qcow2 or zfs:POOL/DATASET (hostd/storage)
    cache_bytes: int = 20 << 30  # the host's cache volumes together (LRU eviction above)

    @property
    def vm_root(self) -> Path:
        return self.state_dir / "vms"

    @property
    def template_root(self) -> Path:
        return self.state_dir / "templates"


def _public(row: dict[str, Any], net: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in row.items() if k != "token"}, **net}


class VMManager:
    def __init__(self, cfg: HostConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = open_store(cfg.state_dir)
        self._agents: dict[str, AgentClient] = {}
        self._agent_lock = threading.Lock()
        self.net = NetManager(self.store, cfg.state_dir, cfg.net)
        vols = self.volumes = open_volumes(self.store, cfg.storage, cfg.state_dir)
        self.templates = Templates(
            self.store, cfg.template_root, cfg.host_id, engine, enabled=cfg.warm, volumes=vols
        )
        cfg.vm_root.mkdir(parents=True, exist_ok=True)
        self.caches = caching.open_caches(self)

    # -- state -------------------------------------------------------------------------------
    def _rows(self) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("vms").rows)

    def _row(self, vm_id: str) -> dict[str, Any]:
        with self.store.lock:
            rows = list(self.store.db.table("vms").rows_where("id = ?", [vm_id]))
        if not rows:
            raise NotFound(f"no VM {vm_id} on host {self.cfg.host_id}")
        return rows[0]

    def _update(self, vm_id: str, **fields: Any) -> None:
        with self.store.lock:
            self.store.db.table("vms").update(vm_id, fields)

    def used(self) -> Resources:
        total = Resources()
        for r in self._rows():
            if r["state"] in ("creating", "running"):
                total = total + Resources(r["cpus"], r["memory_mib"], r["disk_gib"])
        stored = self.templates.disk_bytes() + self.volumes.used_bytes(("image",))  # ZFS copies
        templates_gib = -(-stored // (1 << 30))  # whole GiB, rounded up
        return total + Resources(0, 0, templates_gib)

    def all(self) -> list[dict[str, Any]]:
        return [_public(r, self.net.info(r["id"])) for r in self._rows()]

    def get(self, vm_id: str) -> dict[str, Any]:
        return _public(self._row(vm_id), self.net.info(vm_id))

    def accel(self) -> tuple[str, str]:
        """("kvm"|"tcg", why) for native guests, from a probe boot of a native image."""
        native = [i for i in self.images() if Arch.parse(i.manifest.arch).is_native()]
        if not native:
            return "tcg", "no native image to probe KVM with"
        return choose_accel(native[0])

    def images(self) -> list[Image]:
        return scan(self.cfg.image_path)[0]

    # -- create ------------------------------------------------------------------------------
    def _image(self, name: str) -> Image:
        images = {i.name: i for i in self.images()}
        if name not in images:
            known = ", ".join(sorted(images)) or "none"
            raise BadInput(
                f"host {self.cfg.host_id} has no image {name!r}", hint=f"images here: {known}"
            )
        return images[name]

    def create(self, req: VMRequest) -> dict[str, Any]:
        """Boot a fresh VM and wait until its agent answers.

        Raises:
            BadInput: bad name, size or image. NoCapacity: does not fit (with the numbers).
            EngineError, BootError: the VM did not come up; everything made is removed again.
        """
        image, disk_gib = self._checked(req)
        self._record(req, image, disk_gib)
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            stack.callback(self._reclaim, req.id)
            vmnet = self.net.attach_request(req)
            caching.checkout(self.caches, req)
            self._start({**self._row(req.id), "cold": req.cold}, image, disk_gib, vmnet)
            caching.mount(self.caches, self._agents[req.id], req.id, req.name)
            stack.pop_all()
        self._update(req.id, state="running", boot_s=round(time.monotonic() - t0, 3))
        row = self._row(req.id)
        log.info(
            "VM %s up in %.2f s (%s, guest %.2f s)%s",
            req.name,
            time.monotonic() - t0,
            row["start"],
            row["guest_boot_s"],
            f"; not warm: {row['warm_why']}" if row["warm_why"] else "",
            extra={"vm": req.id, "env": req.env, "image": image.name},
        )
        return self.get(req.id)

    def _start(self, row: dict[str, Any], image: Image, disk_gib: int, vmnet: VmNet) -> None:
        """Restore the VM from its template where there is one, else (or if that fails) boot
        it cold; a missing template is then made in the background for the next VM."""
        accel, _ = choose_accel(image)
        tspec = TemplateSpec(image, vcpus_for(row["cpus"]), row["memory_mib"], disk_gib, accel)
        pick = self.templates.pick(tspec, cold=row.get("cold", False))  # cold: asked for
        why = pick.why
        if caching.cold_start(self, row["id"]):
            return self._boot(row, image, disk_gib, vmnet)
        if pick.row is not None:
            try:
                self._restore(row, image, disk_gib, vmnet, pick.row)
                self.templates.count(pick, warm=True)
                self._update(row["id"], start="warm", template=pick.row["id"], warm_why="")
                return
            except TTError as e:
                why = self.templates.restore_failed(pick.row, e)
                log.warning("VM %s: %s", row["name"], why, extra={"vm": row["id"]})
                self._stop_vm(row)
        self.templates.count(pick, warm=False, why=why if pick.row is not None else "")
        self._update(row["id"], start="cold", template="", warm_why=why)
        self._boot(row, image, disk_gib, vmnet)
        free = self.cfg.total - self.used()  # making a template takes memory for a while
        if pick.reason in ("no_template", "template_failed") and (
            free.memory_mib >= tspec.memory_mib + TCG_OVERHEAD_MIB
        ):
            self.templates.want(tspec)

    def _restore(
        self, row: dict[str, Any], image: Image, disk_gib: int, vmnet: VmNet, tpl: dict[str, Any]
    ) -> None:
        """Restore a clone of tpl as this VM and give it its own identity (warm.py)."""
        workdir = Path(row["workdir"])
        workdir.mkdir(parents=True)
        self._update(row["id"], accel=tpl["accel"], template=tpl["id"], start="warm")
        spec = self._domain_spec(row, image, disk_gib, vmnet, tpl["accel"])
        clone = CloneSpec(spec.name, spec.uuid, workdir, (vmnet.tap, vmnet.mac), spec.metadata)
        started = time.monotonic()
        disk = partial(vm_disk, self.volumes, row["id"], image=image, template=tpl["id"])
        restore_clone(
            self.engine, Path(tpl["dir"]), self.templates.header(tpl), clone, disk, disk_gib
        )
        mem = row["memory_mib"] + (TCG_OVERHEAD_MIB if tpl["accel"] == "tcg" else KVM_OVERHEAD_MIB)
        dns = dns_servers(spec.cmdline)
        net = {"mac": vmnet.mac, "ip": vmnet.ip, "gateway": vmnet.gateway, "dns": dns}
        identity = identity_for(row["name"], row["token"], net)
        alive = lambda: self.engine.is_running(row["domain"])  # noqa: E731
        limits = lambda: self.engine.set_limits(row["domain"], mem, row["cpus"])  # noqa: E731
        agent = wake(clone.agent_socket, tpl["token"], identity, WAKE_TIMEOUT_S, alive, limits)
        with self._agent_lock:
            self._agents[row["id"]] = agent
        self._update(row["id"], guest_boot_s=round(time.monotonic() - started, 3))

    def _stop_vm(self, row: dict[str, Any]) -> None:
        """Close its agent link, remove its domain and work directory."""
        with self._agent_lock:
            agent = self._agents.pop(row["id"], None)
        if agent:
            agent.close()
        if row["domain"]:
            self.engine.destroy(row["domain"])
        self.volumes.destroy(vm_volume(row["id"]))
        workdir = Path(row["workdir"])
        if row["workdir"] and workdir.is_relative_to(self.cfg.vm_root):
            shutil.rmtree(workdir, ignore_errors=True)

    def _checked(self, req: VMRequest) -> tuple[Image, int]:
        """The request's image and disk size, or BadInput saying what is wrong."""
        check_vm_name(req.name)
        image = self._image(req.image)
        return image, disk_for(req, image)

    def _record(self, req: VMRequest, image: Image, disk_gib: int) -> None:
        """The VM's row, written before anything is made, if it fits this host."""
        need = Resources(req.cpus, req.memory_mib, disk_gib)
        domain = f"tt-{self.cfg.host_id}-{req.id}"
        workdir = self.cfg.vm_root / req.id
        with self.store.lock:
            lack = shortfall(need, self.cfg.total, self.used())
            if lack:
                raise NoCapacity(
                    f"host {self.cfg.host_id}: VM {req.name} {lack}",
                    hint="ask for less, delete ENVs, or add hosts",
                )
            if self.store.db.table("vms").count_where("id = ?", [req.id]):
                raise BadInput(f"VM id {req.id} exists on this host", hint="use a new id")
            self.store.db.table("vms").insert(
                {
                    "id": req.id,
                    "env": req.env,
                    "name": req.name,
                    "owner": req.owner,
                    "image": image.name,
                    "arch": image.manifest.arch,
                    "cpus": req.cpus,
                    "memory_mib": req.memory_mib,
                    "disk_gib": disk_gib,
                    "domain": domain,
                    "workdir": str(workdir),
                    "token": secrets.token_hex(16),
                    "accel": "",
                    "state": "creating",
                    "error": "",
                    "boot_s": 0.0,
                    "created_at": now(),
                }
            )

    def _boot(self, row: dict[str, Any], image: Image, disk_gib: int, vmnet: VmNet) -> None:
        workdir = Path(row["workdir"])
        workdir.mkdir(parents=True)
        vm_disk(self.volumes, row["id"], workdir / "disk.qcow2", disk_gib, image=image)
        accel, _ = choose_accel(image)
        self._update(row["id"], accel=accel)
        spec = self._domain_spec(row, image, disk_gib, vmnet, accel)
        self.engine.start(spec)
        overhead = TCG_OVERHEAD_MIB if accel == "tcg" else KVM_OVERHEAD_MIB
        self.engine.set_limits(row["domain"], row["memory_mib"] + overhead, row["cpus"])
        self._wait_for_agent(row, spec, image)

    def _domain_spec(
        self, row: dict[str, Any], image: Image, disk_gib: int, vmnet: VmNet, accel: str
    ) -> DomainSpec:
        cache = self.caches.clone_of(row["id"])
        host = self.cfg.host_id
        return vm_domain(host, row, image, disk_gib, vmnet, accel, cache.path if cache else None)

    def _wait_for_agent(self, row: dict[str, Any], spec: DomainSpec, image: Image) -> None:
        workdir = Path(row["workdir"])
        started = time.monotonic()
        try:
            agent = AgentClient.connect(
                spec.agent_socket, token=row["token"], timeout=BOOT_TIMEOUT_S
            )
        except BootError as e:
            tail = (
                (workdir / "console.log").read_text(errors="replace")[-1500:]
                if (workdir / "console.log").exists()
                else ""
            )
            raise BootError(
                f"VM {row['name']} ({image.name}) did not boot: {e}\n{tail}",
                hint="check the image with `tt image check`",
            ) from None
        with self._agent_lock:
            self._agents[row["id"]] = agent
        self._update(row["id"], guest_boot_s=round(time.monotonic() - started, 3))

    # -- delete and reclaim ------------------------------------------------------------------
    def _reclaim(self, vm_id: str, keep_row: bool = False, commit_cache: bool = False) -> None:
        """Remove everything a VM has: agent link, domain, work directory, cache clone (or
        commit it), and its row."""
        try:
            row = self._row(vm_id)
        except NotFound:
            row = {"id": vm_id, "domain": "", "workdir": ""}
        self._stop_vm(row)
        self.caches.release(vm_id, commit_cache)
        if not row["domain"]:
            return
        self.net.detach(vm_id)
        with self.store.lock:
            if keep_row:
                self.store.db.table("vms").update(vm_id, {"state": "lost"})
            else:
                self.store.db.table("vms").delete(vm_id)
        self.templates.collect()  # a stale template may have lost its last clone

    def delete(self, vm_id: str, commit_cache: bool = False) -> bool:
        """Destroy a VM and forget it; False when it did not exist (delete is idempotent).
        commit_cache: its cache clone becomes the cache's newest version (the job succeeded)."""
        try:
            self._row(vm_id)
            commit = caching.release(self.caches, self.exec, vm_id, commit_cache)
            self._update(vm_id, state="deleting")
        except (NotFound, sqlite_utils.db.NotFoundError):
            return False  # gone already (a concurrent delete): deleting is idempotent
        self._reclaim(vm_id, commit_cache=commit)
        log.info("VM deleted", extra={"vm": vm_id})
        return True

    def mark_lost(self, vm_id: str, why: str) -> None:
        log.warning("VM lost: %s", why, extra={"vm": vm_id})
        self._update(vm_id, error=why)
        self._reclaim(vm_id, keep_row=True)

    # -- exec --------------------------------------------------------------------------------
    def agent(self, vm_id: str) -> AgentClient:
        row = self._row(vm_id)
        if row["state"] != "running":
            raise VMLost(f"VM {row['name']} is {row['state']}: {row['error'] or 'not running'}")
        with self._agent_lock:
            agent = self._agents.get(vm_id)
            if agent is not None and not agent.closed:
                return agent
        sock = Path(row["workdir"]) / "agent.sock"
        try:
            agent = AgentClient.connect(sock, token=row["token"], timeout=10)
        except (BootError, AgentError) as e:
            if self.engine.stopped(row["domain"]):
                self.mark_lost(vm_id, "the VM stopped")
                raise VMLost(f"VM {row['name']} stopped; it is marked lost") from e
            raise
        with self._agent_lock:
            self._agents[vm_id] = agent
        return agent

    def exec(self, vm_id: str, argv: list[str], **kw: Any) -> ExitStatus:
        """Run argv in the VM (see AgentClient.exec). A VM that dies mid-command: VMLost."""
        agent = self.agent(vm_id)
        try:
            return agent.exec(argv, **kw)
        except AgentError:
            row = self._row(vm_id)
            if self.engine.stopped(row["domain"]):
                self.mark_lost(vm_id, f"the VM stopped while running {argv[0]}")
                raise VMLost(
                    f"VM {row['name']} stopped while running {argv[0]}; it is marked lost"
                ) from None
            raise

    # -- restart and shutdown ----------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """After a start: re-attach running VMs, reap what no row owns, finish half-done work."""
        counts = {"reattached": 0, "lost": 0, "reaped": 0, "cleaned": 0}
        counts.update(self.templates.reconcile())
        domains = {
            d.name: d for d in self.engine.ours() if d.metadata.get("host") == self.cfg.host_id
        }
        known = set()
        for row in self._rows():
            known.add(row["domain"])
            dom = domains.get(row["domain"])
            if row["state"] in ("creating", "deleting"):
                self._reclaim(row["id"])
                counts["cleaned"] += 1
            elif row["state"] == "running":
                if dom is not None and dom.running:
                    try:
                        self.agent(row["id"])
                        counts["reattached"] += 1
                        continue
                    except TTError:
                        pass
                self.mark_lost(row["id"], "the VM was gone after hostd restarted")
                counts["lost"] += 1
        for name in domains:
            if name not in known:
                log.warning("reaping VM %s that no state row owns", name)
                self.engine.destroy(name)
                counts["reaped"] += 1
        counts.update(
            reconcile_volumes(self.volumes, self._rows(), self.templates.rows(), self.images())
        )
        rows = {r["id"] for r in self._rows()}
        live = {r["id"] for r in self._rows() if r["state"] == "running"}
        self.net.reconcile(live)
        counts["caches_cleaned"] = self.caches.reconcile(live)
        for d in self.cfg.vm_root.iterdir():
            if d.name not in rows:
                shutil.rmtree(d, ignore_errors=True)
                counts["reaped"] += 1
        counts["templates_dropped"] = len(self.templates.collect(self.images()))
        log.info("reconciled: %s", counts)
        return counts

    def shutdown(self, keep_vms: bool) -> None:
        self.templates.shutdown()
        with self._agent_lock:
            agents = list(self._agents.values())
            self._agents.clear()
        for a in agents:
            a.close()
        if not keep_vms:
            for row in self._rows():
                if row["state"] != "lost":
                    self._reclaim(row["id"])
            self.net.teardown()
            self.volumes.backend.release(str(self.cfg.state_dir.resolve()))  # no VM uses it
        self.engine.close()
