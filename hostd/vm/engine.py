"""The one adapter that owns the libvirt connection. Every libvirtError becomes an EngineError."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from hostd.builders.domain_xml import DomainSpec, domain_xml, metadata_from_xml
from ttci.model.errors import TTError

__all__ = ["PREFIX", "DomainInfo", "Engine", "EngineError"]

log = logging.getLogger("hostd.vm.engine")
PREFIX = "tt-"


class EngineError(TTError):
    """libvirt refused or failed an operation."""


def _quiet(*_args: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    running: bool
    metadata: dict[str, str]


class Engine:
    """libvirt/QEMU engine. Thread-safe: one connection, reopened when it drops."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None

    def _c(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise EngineError(
                    f"cannot connect to libvirt at {self.uri}: {e.get_error_message()}",
                    hint="start libvirtd (`libvirtd -d`, or `service libvirtd start`), "
                    "or run `tt up`, which starts a private one",
                ) from e
            return self._conn

    def check(self) -> str:
        """libvirt and QEMU versions, or EngineError with how to start libvirtd."""
        c = self._c()
        try:
            return f"libvirt {c.getLibVersion()}, qemu {c.getVersion()}"
        except libvirt.libvirtError as e:
            raise EngineError(f"libvirt: {e.get_error_message()}") from e

    def start(self, spec: DomainSpec) -> None:
        """Define and start a domain; on failure nothing stays defined."""
        c = self._c()
        try:
            dom = c.defineXML(domain_xml(spec))
        except libvirt.libvirtError as e:
            raise EngineError(f"libvirt refused VM {spec.name}: {e.get_error_message()}") from e
        try:
            dom.create()
        except libvirt.libvirtError as e:
            self.destroy(spec.name)
            raise EngineError(f"VM {spec.name} did not start: {e.get_error_message()}") from e

    def save(self, name: str, path: Path) -> None:
        """Save a running domain's memory and device state to path; the domain stops."""
        dom = self._lookup(name)
        if dom is None:
            raise EngineError(f"VM {name} vanished before it could be saved")
        try:
            dom.save(str(path))
        except libvirt.libvirtError as e:
            raise EngineError(f"cannot save {name}: {e.get_error_message()}") from e

    def restore(self, path: Path) -> None:
        """Start the domain a save file describes (its header's XML), running.

        On failure nothing stays running under that name."""
        try:
            self._c().restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as e:
            raise EngineError(f"restore of {path.name} failed: {e.get_error_message()}") from e

    def qemu_version(self) -> int:
        """The QEMU version libvirt drives (major * 1e6 + minor * 1e3 + micro)."""
        try:
            return int(self._c().getVersion())
        except libvirt.libvirtError as e:
            raise EngineError(f"libvirt: {e.get_error_message()}") from e

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._c().lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise EngineError(f"libvirt lookup of {name}: {e.get_error_message()}") from e

    def destroy(self, name: str) -> bool:
        """Stop and undefine; True when there was something to remove."""
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and self.is_running(name):
                raise EngineError(f"cannot stop {name}: {e.get_error_message()}") from e
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise EngineError(f"cannot undefine {name}: {e.get_error_message()}") from e
        return True

    def is_running(self, name: str) -> bool:
        dom = self._lookup(name)
        try:
            return bool(dom is not None and dom.isActive())
        except libvirt.libvirtError:
            return False

    def stopped(self, name: str, wait_s: float = 3.0) -> bool:
        """Whether the domain has stopped, waiting up to wait_s for libvirt to notice: a VM's
        agent connection drops the moment QEMU dies, libvirt learns it a little later."""
        deadline = time.monotonic() + wait_s
        while self.is_running(name):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def ours(self) -> list[DomainInfo]:
        """Every domain carrying our metadata, running or not."""
        out = []
        try:
            doms = self._c().listAllDomains(0)
        except libvirt.libvirtError as e:
            raise EngineError(f"cannot list domains: {e.get_error_message()}") from e
        for dom in doms:
            try:
                meta = metadata_from_xml(dom.XMLDesc(0))
                if meta:
                    out.append(DomainInfo(dom.name(), bool(dom.isActive()), meta))
            except libvirt.libvirtError:
                continue  # vanished while we looked
        return out

    def set_limits(self, name: str, memory_limit_mib: int, cpus: float) -> None:
        """Memory hard limit and CPU quota on the VM's cgroup, set after start
        (docs/facts/qemu-and-libvirt.md)."""
        dom = self._lookup(name)
        if dom is None:
            raise EngineError(f"VM {name} vanished before its limits were set")
        try:
            dom.setMemoryParameters(
                {"hard_limit": memory_limit_mib * 1024}, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            period = 100_000
            dom.setSchedulerParametersFlags(
                {"global_period": period, "global_quota": int(cpus * period)},
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as e:
            raise EngineError(f"cannot set limits of {name}: {e.get_error_message()}") from e

    def limits(self, name: str) -> dict[str, int]:
        dom = self._lookup(name)
        if dom is None:
            return {}
        try:
            mem = dom.memoryParameters(0)
            sched = dom.schedulerParameters()
        except libvirt.libvirtError as e:
            raise EngineError(f"cannot read limits of {name}: {e.get_error_message()}") from e
        return {
            "hard_limit_kib": int(mem.get("hard_limit", 0)),
            "global_quota": int(sched.get("global_quota", -1)),
            "global_period": int(sched.get("global_period", 0)),
        }

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
