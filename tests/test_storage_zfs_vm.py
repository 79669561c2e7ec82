"""Real VMs on ZFS: tt-hostd serve --storage zfs:POOL/tt on a zfs-fuse pool (a file in a temporary
directory; tests/zfsutil.py).

One story, as an operator would see it: a warm-start template is made on a clone of the image's
dataset; a warm VM restores from a clone of the template's snapshot and a cold one boots from a
clone of the image's; their disks are files inside their own datasets. hostd is killed with
SIGKILL while a VM is being made: the restarted hostd removes that VM's clone and re-attaches the
others. Deleting the VMs destroys their clones; once the image is gone, `tt-hostd image prune`
removes its template and destroys the image's dataset. Nothing is left in the pool; the pool is
destroyed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudutil import BIN, free_port, leftovers, net_leftovers, qemu_pids, vm_sh
from tests.conftest import built_image
from tests.zfsutil import datasets, zfs_pool
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.scheduler.hostd_client import HostdClient
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
TOKEN = "zfs-storage-test-token"
HOST = "zfsst"
IMAGE = "qemu:debian-12:amd64"
_started: list[subprocess.Popen[bytes]] = []


@contextlib.contextmanager
def _cleanup(state: Path) -> Iterator[None]:
    """Whatever happens: every hostd of the test stops, then its private libvirtd."""
    try:
        yield
    finally:
        for proc in _started:
            stop(proc, grace=STOP_GRACE_S)
        _started.clear()
        pidfile = state / "libvirt" / "libvirtd.pid"
        if pidfile.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """(hostd's state dir, an image path of its own, the ZFS dataset for --storage)."""
    image = built_image("debian-12", "amd64")
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["cp", "-al", str(image.path), str(images / image.path.name)], check=True)
    state = tmp_path / "state"
    with zfs_pool(tmp_path) as dataset, _cleanup(state):
        yield state, images, dataset


def _hostd(state: Path, images: Path, dataset: str, port: int) -> subprocess.Popen[bytes]:
    argv = [*python_main("hostd.cli.main"), "serve", "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(state), "--image-path", str(images), "--host-id", HOST,
            "--private-libvirtd", "--cpu-total", "4", "--mem-total", "4096",
            "--storage", f"zfs:{dataset}"]  # fmt: skip
    state.mkdir(exist_ok=True)
    proc = _spawn(argv, {**BASE_ENV, "TT_HOSTD_TOKEN": TOKEN}, state / "hostd.log", "tt-hostd")
    _started.append(proc)
    return proc


def _ours(dataset: str) -> set[str]:
    """The datasets and snapshots under dataset, relative to it."""
    return {n.removeprefix(dataset + "/") for n in datasets(dataset)}


def _origin(name: str) -> str:
    got = subprocess.run(["zfs", "get", "-H", "-o", "value", "origin", name], capture_output=True)
    return got.stdout.decode().strip()


def _volume_rows(state: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(state / "hostd.db", timeout=5)) as db:
        return list(db.execute("select name, state from volumes order by name").fetchall())


def _warm_template(port: int, images: Path) -> None:
    warm = subprocess.run(
        [BIN / "tt-hostd", "image", "warm", IMAGE, "--size", "1x384", "--listen",
         f"127.0.0.1:{port}", "--hostd-token", TOKEN, "--image-path", str(images)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert warm.returncode == 0 and "ready: template" in warm.stdout, warm.stderr


def _kill_mid_create(hostd: subprocess.Popen[bytes], client: HostdClient, dataset: str) -> None:
    """SIGKILL hostd while a VM boots from its fresh clone."""

    def doomed() -> None:
        with contextlib.suppress(Exception):  # its hostd dies under it
            client.create_vm(VMRequest("doomed", "e2", "doomed", "", IMAGE, memory_mib=384,
                                       cold=True))  # fmt: skip

    threading.Thread(target=doomed, daemon=True).start()
    deadline = time.monotonic() + 120
    while "vm-doomed" not in _ours(dataset):  # its clone is made: it is booting
        assert time.monotonic() < deadline, "the doomed VM's clone never appeared"
        time.sleep(0.02)
    hostd.send_signal(signal.SIGKILL)
    hostd.wait()


def test_vms_templates_crash_and_prune_on_zfs(setup: tuple[Path, Path, str]) -> None:
    state, images, dataset = setup
    port = free_port()
    hostd = _hostd(state, images, dataset, port)
    client = HostdClient(HOST, f"http://127.0.0.1:{port}", TOKEN)
    _warm_template(port, images)
    [tpl] = client._call("GET", "/v1/templates").json()["templates"]
    img = next(n for n in _ours(dataset) if n.startswith("img-") and "@" not in n)
    assert {img, f"{img}@{img}", f"tpl-{tpl['id']}", f"tpl-{tpl['id']}@tpl-{tpl['id']}"} == _ours(
        dataset
    ), "the template's disk is a clone of the image's dataset, frozen by a snapshot"
    assert _origin(f"{dataset}/tpl-{tpl['id']}") == f"{dataset}/{img}@{img}"
    assert client._call("GET", "/v1/host").json()["used"]["disk_gib"] >= 1  # image copy + template

    warm = client.create_vm(VMRequest("warm1", "e", "warm1", "", IMAGE, memory_mib=384))
    cold = client.create_vm(VMRequest("cold1", "e", "cold1", "", IMAGE, memory_mib=384, cold=True))
    assert (warm["start"], cold["start"]) == ("warm", "cold")
    assert _origin(f"{dataset}/vm-warm1") == f"{dataset}/tpl-{tpl['id']}@tpl-{tpl['id']}"
    assert _origin(f"{dataset}/vm-cold1") == f"{dataset}/{img}@{img}"
    disk = state / "vms" / "cold1" / "disk.qcow2"
    assert disk.is_symlink() and str(disk.resolve()).endswith("/vm-cold1/disk.qcow2")
    for vm in ("warm1", "cold1"):
        assert vm_sh(client, vm, f"echo {vm} > /root/mark; sync; cat /root/mark") == (0, f"{vm}\n")

    _kill_mid_create(hostd, client, dataset)
    hostd = _hostd(state, images, dataset, port)
    assert "vm-doomed" not in _ours(dataset), "a clone of a VM half made survived the restart"
    assert ("vm-doomed", "creating") not in _volume_rows(state)
    assert not qemu_pids("tt-zfsst-doomed")
    assert sorted(v["id"] for v in client.vms()) == ["cold1", "warm1"]
    for vm in ("warm1", "cold1"):  # re-attached: same VM, same disk
        assert vm_sh(client, vm, "cat /root/mark") == (0, f"{vm}\n")
        client.delete_vm(vm)
    assert _ours(dataset) == {
        img,
        f"{img}@{img}",
        f"tpl-{tpl['id']}",
        f"tpl-{tpl['id']}@tpl-{tpl['id']}",
    }
    stop(hostd, grace=STOP_GRACE_S)

    # the image goes: prune removes its template and destroys the image's dataset
    for image_dir in images.iterdir():  # hard links: the machine's image stays
        shutil.rmtree(image_dir)
    prune = subprocess.run(
        [BIN / "tt-hostd", "image", "prune", "--json", "--state-dir", str(state),
         "--image-path", str(images), "--cache-dir", str(state / "cache")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert prune.returncode == 0, prune.stderr
    shown = json.loads(prune.stdout)
    assert [t["id"] for t in shown["templates"]] == [tpl["id"]]
    assert shown["image_volumes"] == [img]
    assert _ours(dataset) == set() and _volume_rows(state) == []
    assert leftovers(state) == [] and net_leftovers(state) == []
    assert not qemu_pids(str(state))
