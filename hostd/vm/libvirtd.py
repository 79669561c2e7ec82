"""A private libvirtd (own config, sockets and state in a mount namespace) and a child subreaper.

Hosts with a system libvirtd use `qemu:///system`. The all-in-one mode and the tests start their
own: `unshare -m` with bind mounts over libvirt's directories, so nothing is shared with (or left
in) the host's libvirt, and the daemon's configuration is ours
(docs/facts/qemu-and-libvirt.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ttci.infra.proc import need, spawn, stop
from ttci.model.errors import TTError

__all__ = [
    "DIRS",
    "LIBVIRTD_CONF",
    "QEMU_CONF",
    "LibvirtdError",
    "PrivateLibvirtd",
    "become_subreaper",
]

log = logging.getLogger("hostd.vm.libvirtd")

DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
"""
_PR_SET_CHILD_SUBREAPER = 36


class LibvirtdError(TTError):
    """libvirtd could not be started or reached."""


def _orphaned_qemu_zombies(me: int) -> list[int]:
    """Zombie QEMU processes adopted by us. Only those: a reaper that took any child would steal
    the exit codes of our own subprocesses (Popen would then report 0 for a failed command)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == me and comm.startswith("qemu-system"):
            out.append(int(entry))
    return out


def become_subreaper() -> None:
    """Adopt orphaned QEMU processes and reap them at once (this sandbox's PID 1 takes ~2 s)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return
    me = os.getpid()

    def reap() -> None:
        while True:
            for pid in _orphaned_qemu_zombies(me):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)

    threading.Thread(target=reap, name="subreaper", daemon=True).start()


class PrivateLibvirtd:
    """libvirtd with its own directories under root; `uri` connects to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def _prepare(self) -> None:
        for sub in DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        if not (etc / "qemu.conf").exists():
            shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
            # libvirt's own networks manage iptables and leave rules behind: never start them.
            shutil.rmtree(etc / "qemu" / "networks", ignore_errors=True)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        for target in DIRS.values():
            Path(target).mkdir(parents=True, exist_ok=True)

    @property
    def pidfile(self) -> Path:
        return self.root / "libvirtd.pid"

    def _alive_pid(self) -> int | None:
        """The recorded libvirtd's pid if that process still is a libvirtd (pids get reused)."""
        try:
            pid = int(self.pidfile.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return None
        return pid if b"libvirtd" in cmdline else None

    def start(self, timeout: float = 30) -> None:
        """Start it, or adopt the one a crashed hostd left running (its VMs live on in it).

        Raises:
            LibvirtdError: with libvirtd's output when it does not come up.
        """
        if self._alive_pid() and self.socket.exists():
            log.info("adopting the running private libvirtd at %s", self.socket)
            return
        need("libvirtd")
        need("unshare")
        self._prepare()
        mounts = " && ".join(
            f"mount --bind {self.root / sub} {target}" for sub, target in DIRS.items()
        )
        # Its pid file lives in its own /run/libvirt: private libvirtds must not share one.
        script = (
            f"{mounts} && exec libvirtd -f /etc/libvirt/libvirtd.conf"
            " --pid-file /run/libvirt/libvirtd.pid"
        )
        self.proc = spawn(
            # slave: its bind mounts stay its own; mounts hostd's storage marked shared (the ZFS
            # datasets of VM disks, mounted as they are made) reach it
            ["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
            log_path=self.root / "libvirtd.out",
            new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists():
                self.pidfile.write_text(str(self.proc.pid))
                log.info("private libvirtd up at %s", self.socket)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        out = (self.root / "libvirtd.out").read_text(errors="replace")[-2000:]
        self.stop()
        raise LibvirtdError(f"libvirtd did not start: {out}", hint="check libvirt's install")

    def stop(self) -> None:
        if self.proc is None:
            pid = self._alive_pid()  # adopted: not our child
            if pid:
                os.kill(pid, 15)
                for _ in range(300):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.05)
            self.pidfile.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            return
        stop(self.proc, grace=15)
        self.proc = None
        self.pidfile.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
