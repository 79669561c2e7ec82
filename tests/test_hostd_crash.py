"""hostd killed with SIGKILL mid-ENV: the restarted hostd re-attaches to its running VMs, reaps
what no state row owns, and a graceful stop leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hostd.builders.domain_xml import DomainSpec, domain_xml
from hostd.builders.net_plan import link_prefixes
from hostd.net.links import our_links
from hostd.net.manager import host_key
from hostd.vm.disk import create_overlay
from tests.cloudutil import free_port, leftovers, net_leftovers, qemu_pids, vm_sh
from tests.conftest import IMAGE_PATH, built_image
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop
from ttci.model.arch import Arch
from ttci.scheduler.hostd_client import HostdClient, HostdError
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
TOKEN = "crash-test-token"


def start_hostd(state: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
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
        "crashy",
        "--private-libvirtd",
        "--cpu-total",
        "4",
        "--mem-total",
        "4096",
        *extra,
    ]
    return _spawn(argv, {**BASE_ENV, "TT_HOSTD_TOKEN": TOKEN}, state / "hostd.log", "tt-hostd")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    built_image("debian-12", "amd64")
    yield tmp_path
    # whatever happened, stop the private libvirtd this test's hostd started
    pidfile = tmp_path / "libvirt" / "libvirtd.pid"
    if pidfile.exists():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_sigkill_reattach_reap_and_graceful_stop(state: Path) -> None:
    port = free_port()
    hostd = start_hostd(state, port)
    client = HostdClient("crashy", f"http://127.0.0.1:{port}", TOKEN)
    client.create_vm(
        VMRequest("keep1", "e", "survivor", "", "qemu:debian-12:amd64", memory_mib=384)
    )
    assert vm_sh(client, "keep1", "echo $((6*7)) > /root/mark; cat /root/mark") == (0, "42\n")

    key = host_key(state)
    vm_links = our_links(link_prefixes(key))
    assert len(vm_links) == 2  # the ENV's bridge and the VM's tap

    hostd.send_signal(signal.SIGKILL)
    hostd.wait()
    assert qemu_pids("tt-crashy-keep1"), "the VM must outlive its hostd"
    # A tap of ours that no state row records (made by a hostd that crashed right after).
    stray = f"ttt{key}zzzzzz"
    subprocess.run(["ip", "tuntap", "add", "dev", stray, "mode", "tap"], check=True)

    # While hostd is dead: a domain of ours that no state row knows (as if created by a
    # hostd that crashed before recording it) must be reaped by the next start.
    orphan_dir = state / "vms" / "orphan"
    orphan_dir.mkdir(parents=True)
    image = IMAGE_PATH / "qemu_debian-12_amd64"
    create_overlay(image / "disk.qcow2", orphan_dir / "disk.qcow2")
    conn = libvirt.open(f"qemu:///system?socket={state / 'libvirt' / 'run' / 'libvirt-sock'}")
    spec = DomainSpec(
        name="tt-crashy-orphan",
        uuid=str(uuid.uuid4()),
        arch=Arch.AMD64,
        kernel=image / "vmlinuz",
        initrd=image / "initrd.img",
        cmdline="quiet",
        disk=orphan_dir / "disk.qcow2",
        agent_socket=orphan_dir / "agent.sock",
        console_log=orphan_dir / "console.log",
        memory_mib=256,
        vcpus=1,
        metadata={"host": "crashy", "vm": "orphan"},
    )
    conn.defineXML(domain_xml(spec)).create()
    conn.close()
    assert qemu_pids("tt-crashy-orphan")

    hostd = start_hostd(state, port)
    try:
        # re-attached: the same VM, its disk state intact, still answering
        assert vm_sh(client, "keep1", "cat /root/mark") == (0, "42\n")
        assert [v["id"] for v in client.vms()] == ["keep1"]
        assert not qemu_pids("tt-crashy-orphan")
        assert not orphan_dir.exists()
        assert our_links(link_prefixes(key)) == vm_links  # the stray tap is reaped, ours kept
        assert (
            f"ttci_{key}"
            in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        )
        with pytest.raises(HostdError, match="no VM orphan"):
            client._call("GET", "/v1/vms/orphan")
    finally:
        stop(hostd, grace=STOP_GRACE_S)  # graceful: destroys its VMs and its private libvirtd
    assert leftovers(state) == []
    assert net_leftovers(state) == []
    assert not qemu_pids(str(state))


def test_libvirtd_not_running_says_how_to_start_it(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *python_main("hostd.cli.main"),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--state-dir",
            str(tmp_path),
            "--image-path",
            str(IMAGE_PATH),
            "--libvirt-uri",
            f"qemu:///system?socket={tmp_path}/no-such-sock",
        ],
        env={**BASE_ENV, "TT_HOSTD_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "cannot connect to libvirt" in r.stderr
    assert "start libvirtd" in r.stderr and "tt up" in r.stderr


def test_keep_vms_on_graceful_stop_then_reattach(state: Path) -> None:
    port = free_port()
    hostd = start_hostd(state, port, "--keep-vms")
    client = HostdClient("crashy", f"http://127.0.0.1:{port}", TOKEN)
    client.create_vm(VMRequest("kept", "e", "kept", "", "qemu:debian-12:amd64", memory_mib=384))
    stop(hostd, grace=STOP_GRACE_S)  # SIGTERM with --keep-vms: the VM stays
    assert qemu_pids("tt-crashy-kept")
    hostd = start_hostd(state, port)
    try:
        assert vm_sh(client, "kept", "echo back") == (0, "back\n")
    finally:
        stop(hostd, grace=STOP_GRACE_S)  # without --keep-vms: everything goes
    assert leftovers(state) == []
