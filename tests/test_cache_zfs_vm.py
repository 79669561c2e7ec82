"""Cache volumes with real VMs on ZFS (tt-hostd serve --storage zfs:POOL/tt on a zfs-fuse pool):
a job's clone is a dataset cloned from the newest version's snapshot; a successful job's clone is
promoted into the next version and the older one destroyed; a failed job's clone goes. The next
VM sees exactly what the last successful job wrote; nothing else stays in the pool."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudutil import free_port, leftovers, vm_sh
from tests.conftest import built_image
from tests.zfsutil import datasets, zfs_pool
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.model.cache import parse_cache
from ttci.scheduler.hostd_client import HostdClient
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
TOKEN = "zfs-cache-test-token"
IMAGE = "qemu:debian-12:amd64"


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[tuple[HostdClient, str, Path]]:
    """A hostd on a fresh pool: (its client, the dataset, its state dir); stopped whatever
    happens, then its private libvirtd."""
    image = built_image("debian-12", "amd64")
    images, state = tmp_path / "images", tmp_path / "state"
    images.mkdir()
    state.mkdir()
    subprocess.run(["cp", "-al", str(image.path), str(images / image.path.name)], check=True)
    port = free_port()
    with zfs_pool(tmp_path) as dataset:
        argv = [*python_main("hostd.cli.main"), "serve", "--listen", f"127.0.0.1:{port}",
                "--state-dir", str(state), "--image-path", str(images), "--host-id", "zfscache",
                "--private-libvirtd", "--cpu-total", "4", "--mem-total", "4096", "--no-warm",
                "--storage", f"zfs:{dataset}"]  # fmt: skip
        proc = _spawn(argv, {**BASE_ENV, "TT_HOSTD_TOKEN": TOKEN}, state / "hostd.log", "tt-hostd")
        try:
            yield HostdClient("zfscache", f"http://127.0.0.1:{port}", TOKEN), dataset, state
        finally:
            stop(proc, grace=STOP_GRACE_S)
            pidfile = state / "libvirt" / "libvirtd.pid"
            if pidfile.exists():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
        assert leftovers(state) == []


def _vm(client: HostdClient, vm: str) -> None:
    cache = parse_cache("deps:/cache")
    client.create_vm(VMRequest(vm, "e", vm, "ci", IMAGE, memory_mib=384, cache=cache))


def _caches(dataset: str) -> list[str]:
    return sorted(n.removeprefix(dataset + "/") for n in datasets(dataset) if "/cache-" in n)


def test_cache_versions_are_zfs_clones_promoted_on_commit(
    hostd: tuple[HostdClient, str, Path],
) -> None:
    client, dataset, _ = hostd
    _vm(client, "one")
    assert any(n.endswith("-one") for n in _caches(dataset))  # its clone is a dataset
    assert vm_sh(client, "one", "echo v1 > /cache/f && sync") == (0, "")
    client.delete_vm("one", commit_cache=True)
    _vm(client, "two")
    assert vm_sh(client, "two", "cat /cache/f; echo broken > /cache/f") == (0, "v1\n")
    client.delete_vm("two")  # a failed job: discarded
    _vm(client, "three")
    assert vm_sh(client, "three", "cat /cache/f; echo v2 > /cache/f && sync") == (0, "v1\n")
    client.delete_vm("three", commit_cache=True)
    kept = _caches(dataset)
    assert all("-three" in n for n in kept) and kept, kept  # only the newest version's dataset
    assert [c["version"] for c in client.caches()] == [2]
