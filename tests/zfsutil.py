"""Copy-on-write storage for tests. A real ZFS pool: zfs-fuse (Debian's userspace ZFS; `make
test-deps` installs it) on a sparse file in a temporary directory, with a unique name.

`zfs_pool` starts the zfs-fuse daemon when none runs (and stops it afterwards when it started it
and no other test still holds a pool: a shared flock counts the users), creates the pool and a
dataset `POOL/tt`, and destroys the pool whatever happens. Nothing is skipped: a host where
zfs-fuse cannot run fails the test saying why. A btrfs for reflink copies: `btrfs_dir` (a
loop-mounted file system on a file; btrfs-progs from `make test-deps`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["btrfs_dir", "datasets", "zfs_pool"]

LOCK = Path("/run/ttci-test-zfs-fuse.lock")
PIDFILE = Path("/run/ttci-test-zfs-fuse.pid")


def _zfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=check)


def _daemon_up() -> bool:
    return _zfs("zpool", "list", "-H", "-o", "name", check=False).returncode == 0


def _start_daemon() -> int:
    """Start zfs-fuse; its pid."""
    if not Path("/dev/fuse").exists():
        raise AssertionError("zfs-fuse needs /dev/fuse, which this host lacks (modprobe fuse)")
    deadline = time.monotonic() + 30
    while True:  # a daemon still stopping holds the control socket for a moment
        PIDFILE.unlink(missing_ok=True)  # a stale one (a daemon stopped before) stops it starting
        got = _zfs("zfs-fuse", "--pidfile", str(PIDFILE), "--no-kstat-mount", check=False)
        if got.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"zfs-fuse does not start: {got.stderr.strip() or got.returncode}")
        time.sleep(0.5)
    while not _daemon_up():
        if time.monotonic() > deadline:
            raise AssertionError("zfs-fuse started but `zpool list` never answered")
        time.sleep(0.1)
    return int(PIDFILE.read_text())


def _stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        if "zombie" in Path(f"/proc/{pid}/status").read_text(errors="replace").lower():
            break  # dead; its parent (not us) reaps it
        time.sleep(0.1)


def datasets(root: str) -> list[str]:
    """Every dataset and snapshot under root (root itself left out)."""
    out = _zfs("zfs", "list", "-H", "-t", "all", "-o", "name", "-r", root).stdout.split()
    return [n for n in out if n != root]


@contextlib.contextmanager
def zfs_pool(tmp: Path, size: str = "6G") -> Iterator[str]:
    """A fresh pool on a sparse file under tmp; yields the dataset `POOL/tt` for --storage."""
    assert _zfs("which", "zfs-fuse", check=False).returncode == 0, "run make test-deps (zfs-fuse)"
    with open(LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time
        started = None if _daemon_up() else _start_daemon()
        fcntl.flock(lock, fcntl.LOCK_SH)  # a user of the daemon while the pool lives
        pool = f"tt{uuid.uuid4().hex[:8]}"
        try:
            image = tmp / f"{pool}.img"
            _zfs("truncate", "-s", size, str(image))
            _zfs("zpool", "create", "-m", str(tmp / f"{pool}-mnt"), pool, str(image))
            _zfs("zfs", "create", f"{pool}/tt")
            yield f"{pool}/tt"
        finally:
            for _ in range(20):  # FUSE unmounts can be busy for a moment after the last close
                if _zfs("zpool", "destroy", "-f", pool, check=False).returncode == 0:
                    break
                if _zfs("zpool", "list", pool, check=False).returncode != 0:
                    break
                time.sleep(0.5)
            with contextlib.suppress(OSError):
                (tmp / f"{pool}.img").unlink()
            if started is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds a pool
                except BlockingIOError:
                    pass
                else:
                    _stop_daemon(started)


@contextlib.contextmanager
def btrfs_dir(tmp: Path, size: str = "4G") -> Iterator[Path]:
    """A fresh btrfs (reflink copies) on a sparse file under tmp, loop-mounted; yields a
    directory in it for --storage reflink:DIR. Unmounted (the loop device freed) whatever
    happens."""
    assert Path("/dev/loop-control").exists(), "btrfs on a file needs loop devices (modprobe loop)"
    image, mnt = tmp / f"btrfs-{uuid.uuid4().hex[:8]}.img", tmp / "btrfs"
    _zfs("truncate", "-s", size, str(image))
    _zfs("mkfs.btrfs", "-q", str(image))
    mnt.mkdir()
    _zfs("mount", "-o", "loop", str(image), str(mnt))
    try:
        (mnt / "tt").mkdir()
        yield mnt / "tt"
    finally:
        for _ in range(20):
            if _zfs("umount", str(mnt), check=False).returncode == 0:
                break
            time.sleep(0.5)
        image.unlink(missing_ok=True)
