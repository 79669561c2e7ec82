"""Cache volumes across a hostd SIGKILL: a VM with a cache that was up is re-attached with its
clone (and commits it later); a VM killed mid-create leaves no clone, volume or file once the
restarted hostd has reconciled; a graceful stop leaves nothing but committed versions."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.cloudutil import free_port, leftovers, qemu_pids, vm_sh
from tests.test_hostd_crash import TOKEN, start_hostd, state  # noqa: F401 (a fixture)
from ttci.cli.allinone import STOP_GRACE_S
from ttci.infra.proc import stop
from ttci.model.cache import CacheScope, parse_cache
from ttci.model.errors import TTError
from ttci.scheduler.hostd_client import HostdClient
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
IMAGE = "qemu:debian-12:amd64"
SCOPE = CacheScope("ci", "gitlab:g/p", "deps")


def _req(vm_id: str) -> VMRequest:
    cache = parse_cache("deps:/cache")
    return VMRequest(vm_id, "e", vm_id, "ci", IMAGE, memory_mib=384, cache=cache,
                     cache_project="gitlab:g/p")  # fmt: skip


def _rows(where: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(where / "hostd.db") as db:
        return db.execute(sql).fetchall()


def _files(where: Path) -> list[str]:
    return sorted(p.name for p in (where / "caches" / SCOPE.scope_id).glob("*"))


def test_sigkill_mid_create_leaves_no_clone_and_a_live_one_survives(state: Path) -> None:  # noqa: F811
    port = free_port()
    hostd = start_hostd(state, port)
    client = HostdClient("crashy", f"http://127.0.0.1:{port}", TOKEN)
    try:
        client.create_vm(_req("live1"))
        assert vm_sh(client, "live1", "echo kept > /cache/f && sync") == (0, "")
        failed: list[Exception] = []

        def create() -> None:
            try:
                client.create_vm(_req("dying"))
            except TTError as e:
                failed.append(e)

        t = threading.Thread(target=create)
        t.start()
        deadline = time.monotonic() + 60
        while not any("dying" in f for f in _files(state)):
            assert time.monotonic() < deadline, "the second VM's clone never appeared"
            time.sleep(0.05)
        hostd.send_signal(signal.SIGKILL)  # its clone is made, its VM still booting
        hostd.wait()
        t.join()
        assert failed
    finally:
        if hostd.poll() is None:
            stop(hostd, grace=STOP_GRACE_S)
    hostd = start_hostd(state, port)
    try:
        clones = _rows(state, "select vm from cache_clones")
        assert clones == [("live1",)]  # the dying VM's clone is gone, the live one's kept
        assert not [f for f in _files(state) if "dying" in f]
        assert not qemu_pids("tt-crashy-dying")
        assert vm_sh(client, "live1", "cat /cache/f") == (0, "kept\n")  # still mounted
        client.delete_vm("live1", commit_cache=True)
        assert _rows(state, "select vm from cache_clones") == []
        assert _rows(state, "select version, key from caches") == [(1, "deps")]
        assert len(_files(state)) == 1  # the committed version, nothing else
    finally:
        stop(hostd, grace=STOP_GRACE_S)
    assert leftovers(state) == []
    volumes = _rows(state, "select name, kind, state from volumes where kind = 'cache'")
    assert [(k, s) for _, k, s in volumes] == [("cache", "frozen")]
