"""File-system helpers that must never cross into the host: unmount first, one file system."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ttci.infra.proc import run
from ttci.model.errors import ImageError

__all__ = ["atomic_replace_dir", "free_bytes", "mounts_below", "safe_rmtree", "unmount_below"]


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below path, deepest first (from /proc/self/mounts)."""
    root = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == root or mnt.startswith(root.rstrip("/") + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: Path) -> None:
    for mnt in mounts_below(path):
        run(["umount", "--lazy", mnt], check=False)
    left = mounts_below(path)
    if left:
        raise ImageError(f"could not unmount {', '.join(left)}", hint="unmount them by hand")


def safe_rmtree(path: Path) -> None:
    """Remove a build tree that may hold mounts (mmdebstrap mounts /dev, /proc, /sys)."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_below(path)
    run(["rm", "-rf", "--one-file-system", "--", str(path)])


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def atomic_replace_dir(new: Path, final: Path) -> None:
    """Put new at final; an older final is moved aside first and then removed."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    with contextlib.suppress(FileNotFoundError):
        safe_rmtree(old)
