"""hostd killed with SIGKILL in the middle of restoring a clone: the restarted hostd removes
everything of that VM (domain, overlay, save file copy, tap, row), re-attaches the clones that
were running (their own credentials still open them), and a graceful stop leaves nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudutil import BIN, free_port, leftovers, net_leftovers, qemu_pids, vm_sh
from tests.conftest import IMAGE_PATH, built_image
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.scheduler.hostd_client import HostdClient
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
TOKEN = "warm-crash-test-token"
HOST = "warmcr"
IMAGE = "qemu:debian-12:amd64"


def _hostd(state: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [
        *python_main("hostd.cli.main"),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--image-path",
        str(IMAGE_PATH),
        "--host-id",
        HOST,
        "--private-libvirtd",
        "--cpu-total",
        "4",
        "--mem-total",
        "4096",
    ]
    proc = _spawn(argv, {**BASE_ENV, "TT_HOSTD_TOKEN": TOKEN}, state / "hostd.log", "tt-hostd")
    _started.append(proc)
    return proc


_started: list[subprocess.Popen[bytes]] = []


def _vm_row(state: Path, vm_id: str) -> dict[str, str] | None:
    with contextlib.closing(sqlite3.connect(state / "hostd.db", timeout=5)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("select * from vms where id = ?", [vm_id]).fetchone()
    return dict(row) if row else None


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    built_image("debian-12", "amd64")
    yield tmp_path
    for proc in _started:  # whatever happened, no hostd of this test outlives it
        stop(proc, grace=STOP_GRACE_S)
    _started.clear()
    pidfile = tmp_path / "libvirt" / "libvirtd.pid"
    if pidfile.exists():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_sigkill_during_restore(state: Path) -> None:
    port = free_port()
    hostd = _hostd(state, port)
    client = HostdClient(HOST, f"http://127.0.0.1:{port}", TOKEN)
    warm = subprocess.run(
        [BIN / "tt-hostd", "image", "warm", IMAGE, "--size", "1x384", "--listen",
         f"127.0.0.1:{port}", "--hostd-token", TOKEN, "--image-path", str(IMAGE_PATH)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert warm.returncode == 0 and "ready: template" in warm.stdout, warm.stderr
    [tpl] = client._call("GET", "/v1/templates").json()["templates"]
    assert (tpl["state"], tpl["memory_mib"]) == ("ready", 384)
    keep = client.create_vm(VMRequest("keep", "e", "survivor", "", IMAGE, memory_mib=384))
    assert keep["start"] == "warm"
    assert vm_sh(client, "keep", "echo 42 > /root/mark; cat /root/mark") == (0, "42\n")

    def doomed() -> None:
        with contextlib.suppress(Exception):  # its hostd dies under it
            client.create_vm(VMRequest("doomed", "e2", "doomed", "", IMAGE, memory_mib=384))

    threading.Thread(target=doomed, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = _vm_row(state, "doomed")
        if row and row["template"] and row["state"] == "creating":
            break  # restoring: the row names its template before anything of the clone exists
        time.sleep(0.005)
    else:
        raise AssertionError("the restore never started")
    hostd.send_signal(signal.SIGKILL)
    hostd.wait()
    assert qemu_pids("tt-warmcr-keep"), "the clone must outlive its hostd"

    hostd = _hostd(state, port)
    try:
        assert _vm_row(state, "doomed") is None
        assert not qemu_pids("tt-warmcr-doomed")
        assert not (state / "vms" / "doomed").exists()
        assert not list(state.rglob("vms/*/vm.save"))
        assert [v["id"] for v in client.vms()] == ["keep"]
        # re-attached with the clone's own token: same VM, same disk
        assert vm_sh(client, "keep", "cat /root/mark; hostname") == (0, "42\nsurvivor\n")
        [tpl_now] = client._call("GET", "/v1/templates").json()["templates"]
        assert (tpl_now["id"], tpl_now["state"]) == (tpl["id"], "ready")
    finally:
        stop(hostd, grace=STOP_GRACE_S)
    found = [f for f in leftovers(state) if not f.startswith("cgroup ") or f"-tt-{HOST}-" in f]
    assert found == []
    assert net_leftovers(state) == []
    assert not qemu_pids(str(state))
