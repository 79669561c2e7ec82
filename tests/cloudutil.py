"""Helpers for tests that run the real cloud: free ports, the CLI as a subprocess, leftovers."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ttci.wire.commands import EventKind, ExecRequest

if TYPE_CHECKING:
    from ttci.cli.allinone import Stack
    from ttci.scheduler.hostd_client import HostdClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_sh(client: HostdClient, vm_id: str, cmd: str) -> tuple[int | None, str]:
    """`sh -c cmd` in a VM through its hostd: (exit code, stdout)."""
    out, code = [], None
    for ev in client.exec(vm_id, ExecRequest(("sh", "-c", cmd))):
        if ev.kind is EventKind.STDOUT:
            out.append(ev.data.decode())
        elif ev.status is not None:
            code = ev.status.code
        elif ev.kind is EventKind.ERROR:
            raise AssertionError(ev.message)
    return code, "".join(out)


def tt(*args: str, config: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TT_CONFIG": str(config)}
    return subprocess.run(
        [BIN / "tt", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def qemu_pids(marker: str, *, templates: bool = True) -> list[int]:
    """QEMU processes whose command line mentions marker (a state dir or a domain name);
    templates=False leaves out hostd's warm-start template VMs (made in the background on
    a size's first use: hostd's own work, not a user's VM)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd and (templates or "-tpl-" not in cmd):
            pids.append(int(d.name))
    return pids


def cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 cgroup directory of pid for controller (memory, cpu)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path("/sys/fs/cgroup") / ctrls / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for {pid}")


TEMPLATE_SETTLE_S = 45.0  # how long leftovers() waits for a running hostd's template build


def hostd_state(state_dir: Path) -> Path:
    """hostd's state dir: state_dir/hostd for `tt up`'s layout, else state_dir itself."""
    sub = state_dir / "hostd"
    return sub if sub.is_dir() else state_dir


def leftovers(
    state_dir: Path, host_id: str | None = None, settle_s: float = TEMPLATE_SETTLE_S
) -> list[str]:
    """What the stack at state_dir (`tt up`'s layout, or a hostd's own state dir) must not leave:
    QEMU processes, VM work dirs, sockets, VM cgroups, hostd state rows, its nft table and links.

    Scoped to that stack, so it holds while other tests' clouds run: QEMU processes are those
    whose command line names a path in hostd's state dir, cgroups those of domains its libvirtd
    ran (a private libvirtd keeps every domain's log under state/libvirt/log/qemu; with a shared
    libvirt, pass host_id: domains are named tt-HOST-...).

    Warm start: hostd makes snapshot templates in the background (tt-HOST-tpl-ID, files under
    state/templates/ID). A finished template is hostd's cache, not a leftover. While hostd runs
    and a template is still being made, this waits up to settle_s for it; one still being made
    after that is hostd's own work in progress and is not counted (hostd removes it when it
    stops). Once hostd has stopped, a template VM still running, or a template row still marked
    building, IS a leftover."""
    hostd = hostd_state(state_dir)
    building = _settle_templates(hostd, settle_s)

    def mine(text: str) -> bool:  # part of a template hostd is still making
        return any(
            f"-tpl-{t}" in text or f"/templates/{t}/" in text or f"-{dom[:20]}/" in text
            for t, dom in building  # libvirt's own dirs of a domain: domain-N-NAME[:20]/
        )

    found = [f"qemu pid {p}" for p, cmd in _qemu_cmdlines(f"{hostd}/") if not mine(cmd)]
    vms = hostd / "vms"
    if vms.exists():
        found += [f"workdir {d}" for d in vms.iterdir()]
    found += [f"socket {s}" for s in state_dir.rglob("*.sock") if not mine(f"{s}")]
    found += [f"cgroup {d}" for d in vm_cgroups(our_domains(hostd, host_id)) if not mine(d.name)]
    rows = _rows(hostd, "select id, state from vms")
    found += [f"hostd state row {r}" for r in rows]
    if not hostd_running(hostd):
        tpl = _rows(hostd, "select id, state from templates where state = 'building'")
        found += [f"template row {r} (hostd stopped)" for r in tpl]
    return found + net_leftovers(hostd)


def _rows(hostd: Path, sql: str) -> list[tuple[object, ...]]:
    db = hostd / "hostd.db"
    if not db.exists():
        return []
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return list(conn.execute(sql).fetchall())
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise


def _settle_templates(hostd: Path, settle_s: float) -> list[tuple[str, str]]:
    """Wait (up to settle_s) while a running hostd makes a template; (id, domain) of those it is
    still making after that ([] when hostd is not running: nothing of its is in progress)."""
    deadline = time.monotonic() + settle_s
    sql = "select id, domain from templates where state = 'building'"
    while True:
        if not hostd_running(hostd):
            return []
        rows = [(str(r[0]), str(r[1])) for r in _rows(hostd, sql)]
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _cmdlines() -> Iterator[tuple[int, list[str]]]:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(d.name), raw.decode(errors="replace").split("\0")


def hostd_running(hostd: Path) -> bool:
    """Whether a tt-hostd serves the state dir hostd (found by its --state-dir argument)."""
    want = str(hostd)
    for _, argv in _cmdlines():
        daemon = any("hostd.cli.main" in a or a.endswith("tt-hostd") for a in argv[:6])
        if daemon and any(p == ("--state-dir", want) for p in itertools.pairwise(argv)):
            return True
    return False


def _qemu_cmdlines(marker: str) -> list[tuple[int, str]]:
    out = []
    for pid, argv in _cmdlines():
        cmd = " ".join(argv)
        if "qemu-system" in cmd and marker in cmd:
            out.append((pid, cmd))
    return out


def our_domains(hostd: Path, host_id: str | None = None) -> Callable[[str], bool]:
    """Whether a libvirt domain name is one of the stack's with hostd state dir hostd: one its
    private libvirtd ran (a log file each, kept after the domain is gone), one of its templates
    (and their self-test clones), or, given host_id, any tt-HOST-... (a shared libvirt)."""
    logs = hostd / "libvirt" / "log" / "qemu"
    names = {f.name.removesuffix(".log") for f in logs.glob("*.log")} if logs.is_dir() else set()
    tpl = [str(r[0]) for r in _rows(hostd, "select domain from templates")]
    prefix = f"tt-{host_id}-" if host_id and not logs.is_dir() else None

    def ours(name: str) -> bool:
        if name in names or any(name == t or name.startswith(f"{t}-t") for t in tpl):
            return True
        return prefix is not None and name.startswith(prefix)

    return ours


_CGROUP_NAME = re.compile(r"(?:machine-)?qemu-\d+-(?P<name>.+?)(?:\.libvirt-qemu|\.scope)")


def cgroup_domain(dirname: str) -> str | None:
    """The domain a libvirt machine cgroup belongs to, from its directory's name
    (qemu-ID-NAME.libvirt-qemu; machined's machine-qemu\\x2dID\\x2dNAME.scope)."""
    m = _CGROUP_NAME.fullmatch(dirname.replace("\\x2d", "-"))
    return m["name"] if m else None


def vm_cgroups(ours: Callable[[str], bool] | None = None) -> list[Path]:
    """cgroups libvirt made for our domains (named after them: tt-HOST-VMID); ours: which domain
    names count (None: every tt- domain on the machine)."""
    out: list[Path] = []
    for ctrl in ("memory", "cpu", "blkio", "pids"):
        base = Path("/sys/fs/cgroup") / ctrl / "machine"
        if not base.is_dir():
            continue
        for d in base.iterdir():
            name = cgroup_domain(d.name) if d.is_dir() else None
            if name is None:
                if d.is_dir() and "-tt-" in d.name and ours is None:
                    out.append(d)
                continue
            if name.startswith("tt-") and (ours is None or ours(name)):
                out.append(d)
    return out


def net_leftovers(hostd_state: Path) -> list[str]:
    """The nftables table and the bridges/taps of the hostd with this state dir."""
    from hostd.builders.net_plan import link_prefixes
    from hostd.net.links import our_links
    from hostd.net.manager import host_key

    key = host_key(hostd_state)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found = [f"nft table {t}" for t in tables.split() if t == f"ttci_{key}"]
    return found + [f"link {n}" for n in our_links(link_prefixes(key))]


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
