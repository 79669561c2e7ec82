"""The VM manager's cache-volume steps: the host's caches on its volumes, a VM's clone mounted
in its guest before the VM is reported up, and released (clean file system) before it goes.

Warm starts: a VM with a cache boots cold (a template's saved machine has no second disk; hot
plugging one after a restore would work on some architectures only), and the manager says so
in the VM's `warm_why`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hostd.cache.guest import mount_argv, release_argv
from hostd.cache.store import CacheStore
from hostd.storage.qcow2 import Qcow2Backend
from hostd.storage.volumes import Volumes
from hostd.vm.agent_client import AgentClient
from ttci.model.errors import BootError, TTError
from ttci.wire.agent_protocol import ExitStatus
from ttci.wire.envs import VMRequest

__all__ = [
    "MOUNT_TIMEOUT_S",
    "NOT_WARM",
    "checkout",
    "cold_start",
    "mount",
    "open_caches",
    "release",
]

log = logging.getLogger("hostd.vm.caching")
MOUNT_TIMEOUT_S = 60.0
NOT_WARM = "it has a cache volume (a template has no second disk)"
Exec = Callable[..., ExitStatus]


def open_caches(mgr: Any) -> CacheStore:
    """The host's caches (the VMManager's), on its volumes (the qcow2 backend's if it has none)."""
    vols = getattr(mgr, "volumes", None) or Volumes(mgr.store, Qcow2Backend())
    return CacheStore(mgr.store, vols, mgr.cfg.state_dir / "caches", mgr.cfg.cache_bytes)


def cold_start(mgr: Any, vm_id: str) -> bool:
    """A VM with a cache boots cold (recorded with why); False: it may start warm."""
    if mgr.caches.clone_of(vm_id) is None:
        return False
    mgr._update(vm_id, start="cold", template="", warm_why=NOT_WARM)
    return True


def checkout(caches: CacheStore, req: VMRequest) -> None:
    """The VM's clone of its cache (recorded, made) before the VM is defined."""
    scope = req.cache_scope
    if scope is not None and req.cache is not None:
        caches.checkout(req.id, scope, req.cache.path)


def mount(caches: CacheStore, agent: AgentClient, vm_id: str, name: str) -> None:
    """Mount the VM's cache at its path in the guest (through its agent: the VM is not yet
    running for anyone else), or BootError saying why not."""
    clone = caches.clone_of(vm_id)
    if clone is None:
        return
    out: list[bytes] = []
    st = agent.exec(
        mount_argv(clone.mount),
        timeout=MOUNT_TIMEOUT_S,
        on_stdout=out.append,
        on_stderr=out.append,
        max_output=1 << 16,
    )
    if st.code != 0:
        raise BootError(
            f"VM {name}: its cache could not be mounted at {clone.mount}: "
            f"{b''.join(out).decode(errors='replace').strip()[-500:]}",
            hint="the image needs mount and an ext4 kernel module (tt image check)",
        )


def release(caches: CacheStore, exec_: Exec, vm_id: str, commit: bool) -> bool:
    """Before the VM goes: unmount (or freeze) its cache so the file system is clean. Whether
    its clone may be committed (asked to, and released cleanly)."""
    clone = caches.clone_of(vm_id)
    if clone is None or not commit:
        return False
    try:
        st = exec_(vm_id, release_argv(clone.mount), timeout=MOUNT_TIMEOUT_S, max_output=1 << 16)
    except TTError as e:
        log.warning("VM %s: cache not released (%s); not committed", vm_id, e)
        return False
    if st.code != 0:
        log.warning("VM %s: cache release exited %s; not committed", vm_id, st.code)
    return st.code == 0
