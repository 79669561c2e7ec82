"""Helpers for tests that run the real cloud: free ports, the CLI as a subprocess, leftovers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ttci.cli.allinone import Stack

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tt(*args: str, config: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TT_CONFIG": str(config)}
    return subprocess.run(
        [BIN / "tt", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions marker (a state dir or a domain name)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd:
            pids.append(int(d.name))
    return pids


def cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 cgroup directory of pid for controller (memory, cpu)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path("/sys/fs/cgroup") / ctrls / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for {pid}")


def leftovers(state_dir: Path) -> list[str]:
    """What a stopped cloud must not leave: QEMU processes, VM work dirs, sockets."""
    found = [f"qemu pid {p}" for p in qemu_pids(str(state_dir))]
    vms = state_dir / "hostd" / "vms"
    if vms.exists():
        found += [f"workdir {d}" for d in vms.iterdir()]
    found += [f"socket {s}" for s in state_dir.rglob("*.sock")]
    found += [f"cgroup {d}" for d in vm_cgroups()]
    db = state_dir / "hostd" / "hostd.db"
    if db.exists():
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("select id, state from vms").fetchall()
        found += [f"hostd state row {r}" for r in rows]
    return found + net_leftovers(state_dir / "hostd")


def net_leftovers(hostd_state: Path) -> list[str]:
    """The nftables table and the bridges/taps of the hostd with this state dir."""
    from hostd.builders.net_plan import link_prefixes
    from hostd.net.links import our_links
    from hostd.net.manager import host_key

    key = host_key(hostd_state)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found = [f"nft table {t}" for t in tables.split() if t == f"ttci_{key}"]
    return found + [f"link {n}" for n in our_links(link_prefixes(key))]


def vm_cgroups() -> list[Path]:
    """cgroups libvirt made for our domains (named after them: tt-HOST-VMID)."""
    out: list[Path] = []
    for ctrl in ("memory", "cpu", "blkio", "pids"):
        base = Path("/sys/fs/cgroup") / ctrl / "machine"
        if base.is_dir():
            out += [d for d in base.iterdir() if d.is_dir() and "-tt-" in d.name]
    return out


def configure_client(scheduler: str, token: str, cfg: Path) -> None:
    """Write a client config at cfg pointing at a test cloud (as `tt up` does for users)."""
    from ttci.client import config

    os.environ["TT_CONFIG"] = str(cfg)
    try:
        config.save(scheduler, token)
    finally:
        os.environ.pop("TT_CONFIG")


@contextlib.contextmanager
def small_cloud(state: Path, cpu_total: float = 4, mem_total: int = 3072) -> Iterator[Stack]:
    """`tt up`'s stack on free loopback ports with the images under IMAGE_PATH, its client
    configured at state/client.json; on exit, checks that nothing is left behind."""
    import concurrent.futures

    from tests.conftest import IMAGE_PATH
    from ttci.cli.allinone import running

    with running(
        state,
        IMAGE_PATH,
        scheduler_listen=f"127.0.0.1:{free_port()}",
        hostd_listen=f"127.0.0.1:{free_port()}",
        cpu_total=cpu_total,
        mem_total=mem_total,
    ) as stack:
        configure_client(stack.scheduler, stack.token, state / "client.json")
        yield stack
    # In a thread of its own: pyroute2 cannot run inside a caller's event loop (Playwright's).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(leftovers, state).result() == []
