"""The empty cache volume's file system, made on the host once per size.

A cache's first version starts from a fresh ext4: made here in a sparse raw file (lazy init keeps
it sparse; the guest mounts with noinit_itable so it stays so), kept as a small qcow2, and
written into a new empty volume of any backend with `qemu-img convert -n` (every backend's disk
file is qcow2).
"""

from __future__ import annotations

import os
from pathlib import Path

from ttci.infra.proc import run

__all__ = ["empty_fs", "write_empty_fs"]

_MKFS = ["mkfs.ext4", "-F", "-q", "-m", "0", "-L", "tt-cache"]
_MKFS_E = "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"


def empty_fs(root: Path, size_gib: int) -> Path:
    """root/empty-ext4-SIZEg.qcow2, made once (atomically: a half-made one is never used)."""
    path = root / f"empty-ext4-{size_gib}g.qcow2"
    if path.exists():
        return path
    raw = root / f".empty-{size_gib}g.raw.tmp"
    tmp = root / f".empty-{size_gib}g.qcow2.tmp"
    try:
        with open(raw, "wb") as f:
            f.truncate(size_gib << 30)
        run([*_MKFS, "-E", _MKFS_E, str(raw)])
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
        os.replace(tmp, path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


def write_empty_fs(template: Path, disk: Path) -> None:
    """Lay the empty file system into disk (a fresh, empty qcow2 volume of the same size)."""
    argv = ["qemu-img", "convert", "-q", "-n", "--target-is-zero", "-f", "qcow2", "-O", "qcow2"]
    run([*argv, str(template), str(disk)])
