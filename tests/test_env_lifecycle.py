"""The ENV lifecycle on one host, for real: `tt up`'s stack (scheduler, hostd, a private
libvirtd), real VMs of two architectures, the `tt` CLI as a user runs it, and checks that
nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudutil import cgroup_dir, configure_client, free_port, leftovers, qemu_pids, tt
from tests.conftest import IMAGE_PATH, built_image
from ttci.cli.allinone import Stack, running

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    built_image("debian-12", "amd64")
    built_image("debian-12", "arm64")
    state = tmp_path_factory.mktemp("cloud")
    cfg = state / "client.json"
    with running(
        state,
        IMAGE_PATH,
        scheduler_listen=f"127.0.0.1:{free_port()}",
        hostd_listen=f"127.0.0.1:{free_port()}",
        cpu_total=8,
        mem_total=6144,
    ) as stack:
        configure_client(stack.scheduler, stack.token, cfg)
        yield stack, cfg
    # A graceful stop destroys every VM and leaves nothing on the host.
    assert leftovers(state) == []


def _show(name: str, cfg: Path) -> dict[str, object]:
    r = tt("env", "show", name, "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_matrix_env_over_two_arches(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    r = tt(
        "env",
        "add",
        "matrix",
        "--os-prefix",
        "qemu:debian-12:amd64,DEBIAN-12:ARM64",
        "--mem",
        "384",
        config=cfg,
    )
    assert r.returncode == 0, r.stderr
    env = _show("matrix", cfg)
    vms = {v["name"]: v for v in env["vms"]}  # type: ignore[attr-defined]
    assert set(vms) == {"debian-12-amd64", "debian-12-arm64"}
    assert all(v["state"] == "running" and v["host"] == "local" for v in vms.values())

    r = tt("env", "run", "matrix", "--cmd", "uname -m; echo to-stderr >&2", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "[debian-12-amd64] x86_64" in r.stdout
    assert "[debian-12-arm64] aarch64" in r.stdout
    assert "[debian-12-arm64] to-stderr" in r.stderr
    assert "2/2 VMs succeeded" in r.stdout

    # Each VM is its own libvirt domain in its own cgroup, with our limits applied.
    for vm in ("debian-12-amd64", "debian-12-arm64"):
        [pid] = qemu_pids(f"tt-local-{_vm_id(stack, vm)}")
        mem = cgroup_dir(pid, "memory")
        assert "libvirt" in str(mem) or "machine" in str(mem)
        limit = int((mem / "memory.limit_in_bytes").read_text())
        assert limit == (384 + 384) << 20  # the VM's memory plus TCG's overhead
        cpu = cgroup_dir(pid, "cpu")  # QEMU's main thread sits in .../emulator
        while not cpu.name.endswith(".libvirt-qemu"):
            cpu = cpu.parent
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 100_000  # 1 CPU

    r = tt("env", "del", "matrix", config=cfg)
    assert r.returncode == 0, r.stderr
    assert leftovers(stack.state_dir) == []  # no QEMU, overlay, socket, cgroup or state row
    r = tt("env", "run", "matrix", "--cmd", "true", config=cfg)
    assert r.returncode == 1 and "no ENV named 'matrix'" in r.stderr


def _vm_id(stack: Stack, name: str) -> str:
    import sqlite3

    db = sqlite3.connect(stack.state_dir / "scheduler" / "scheduler.db")
    (vm_id,) = db.execute("select id from vms where name = ?", [name]).fetchone()
    return str(vm_id)


def test_push_get_exit_codes_and_dup_each(cloud: tuple[Stack, Path], tmp_path: Path) -> None:
    _, cfg = cloud
    r = tt(
        "env",
        "add",
        "files",
        "--os-prefix",
        "debian-12:amd64",
        "--dup-each",
        "2",
        "--mem",
        "384",
        config=cfg,
    )
    assert r.returncode == 0, r.stderr
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data.txt").write_text("payload ✓\n")
    r = tt("env", "push", "files", str(src), "/root/in", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    r = tt(
        "env",
        "run",
        "files",
        "--cmd",
        "cat /root/in/src/sub/data.txt; hostname > /root/out.txt; "
        "test $(hostname) = debian-12-amd64-1",
        config=cfg,
    )
    assert r.returncode == 1  # the -2 VM fails the test
    assert r.stdout.count("payload ✓") == 2
    assert "exit 1" in r.stdout and "1/2 VMs succeeded" in r.stdout
    r = tt("env", "get", "files", "/root/out.txt", str(tmp_path / "got"), config=cfg)
    assert r.returncode == 0, r.stdout
    for name in ("debian-12-amd64-1", "debian-12-amd64-2"):
        assert (tmp_path / "got" / name / "out.txt").read_text().strip() == name
    r = tt("env", "get", "files", "/no/such/file", str(tmp_path / "none"), config=cfg)
    assert r.returncode == 1 and "cannot read /no/such/file" in r.stdout
    assert tt("env", "del", "files", config=cfg).returncode == 0


@pytest.mark.parametrize(
    ("args", "rc", "message"),
    [
        (["bad_name!", "--os-prefix", "debian"], 2, "ENV name 'bad_name!' is not valid"),
        (["x1", "--os-prefix", "centos"], 2, "no image matches --os-prefix 'centos'"),
        (["x2", "--os-prefix", "debian-12:amd64", "--mem", "99999999"], 2, "outside 128"),
        (["x3", "--os-prefix", "debian-12:amd64", "--life-time", "forever"], 2, "does not parse"),
        (
            ["x4", "--os-prefix", "debian-12:amd64", "--dup-each", "40", "--mem", "1024"],
            1,
            # Refused at once, for the whole ENV (it could never fit: it does not queue).
            "the ENV (40 VMs) needs 40 CPUs",
        ),
        (["x5", "--os-prefix", "debian-12:amd64", "--vm-port", "22,22"], 2, "asked for twice"),
    ],
)
def test_bad_env_requests_are_explained_and_leave_nothing(
    cloud: tuple[Stack, Path], args: list[str], rc: int, message: str
) -> None:
    stack, cfg = cloud
    r = tt("env", "add", *args, config=cfg)
    assert r.returncode == rc, r.stdout + r.stderr
    assert message in r.stderr
    assert "hint:" in r.stderr
    assert json.loads(tt("env", "list", "--json", config=cfg).stdout) == []
    assert list((stack.state_dir / "hostd" / "vms").iterdir()) == []


def test_name_clash_and_lifetime_reaper(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    r = tt(
        "env",
        "add",
        "short",
        "--os-prefix",
        "debian-12:amd64",
        "--life-time",
        "10s",
        "--mem",
        "384",
        config=cfg,
    )
    assert r.returncode == 0, r.stderr
    r = tt("env", "add", "short", "--os-prefix", "debian-12:amd64", config=cfg)
    assert r.returncode == 1 and "an ENV named 'short' exists" in r.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if json.loads(tt("env", "list", "--json", config=cfg).stdout) == []:
            break
        time.sleep(2)
    assert json.loads(tt("env", "list", "--json", config=cfg).stdout) == []
    assert not qemu_pids(str(stack.state_dir))
    assert list((stack.state_dir / "hostd" / "vms").iterdir()) == []


def test_vm_dying_mid_command_is_reported_lost(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    assert (
        tt(
            "env", "add", "doomed", "--os-prefix", "debian-12:amd64", "--mem", "384", config=cfg
        ).returncode
        == 0
    )
    [pid] = qemu_pids(f"tt-local-{_vm_id(stack, 'debian-12-amd64')}")
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(
            tt("env", "run", "doomed", "--cmd", "echo started; sleep 60", config=cfg)
        )
    )
    t.start()
    time.sleep(4)
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=60)
    r = result[0]
    assert r.returncode == 1  # type: ignore[attr-defined]
    # The result table may wrap the reason over lines: read it without the box and the breaks.
    text = " ".join(r.stdout.replace("│", " ").split())  # type: ignore[attr-defined]
    assert "stopped while running" in text and "VM lost" in text, r.stdout  # type: ignore[attr-defined]
    env = _show("doomed", cfg)
    assert env["lost"] == 1
    assert env["vms"][0]["state"] == "lost"  # type: ignore[index]
    assert tt("env", "del", "doomed", config=cfg).returncode == 0
    assert list((stack.state_dir / "hostd" / "vms").iterdir()) == []


def test_status_and_images(cloud: tuple[Stack, Path]) -> None:
    _, cfg = cloud
    r = tt("status", "--server", "--json", config=cfg)
    [host] = json.loads(r.stdout)
    assert host["id"] == "local" and host["state"] == "up"
    assert host["accel"] in ("kvm", "tcg") and host["total"]["cpus"] == 8
    r = tt("image", "list", "--json", config=cfg)
    names = {i["name"] for i in json.loads(r.stdout)}
    assert {"qemu:debian-12:amd64", "qemu:debian-12:arm64"} <= names


def test_wrong_token_is_refused_with_a_hint(cloud: tuple[Stack, Path], tmp_path: Path) -> None:
    stack, _ = cloud
    bad = tmp_path / "bad.json"
    configure_client(stack.scheduler, "not-the-token", bad)
    r = tt("env", "list", config=bad)
    assert r.returncode == 1
    assert "missing or wrong token" in r.stderr and "hint:" in r.stderr
