"""The qcow2 backend (the default): every writable volume is a qcow2 overlay on its frozen source.

An image is its own read-only disk file (nothing is imported); a VM's or template's disk is an
overlay at `dest`; freezing makes the file read-only; a commit rebases the overlay onto nothing
(it copies what it read from its source), so older versions can go.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hostd.builders.qemu_argv import overlay_argv
from hostd.storage.base import Backend
from ttci.infra.proc import run

__all__ = ["Qcow2Backend", "create_overlay"]


def create_overlay(base: Path, path: Path, size_gib: int | None = None) -> None:
    """Make path a qcow2 overlay of base (size_gib: its virtual size, else base's)."""
    run(overlay_argv(base, path, size_gib))


class Qcow2Backend(Backend):
    kind = "qcow2"
    owns_imports = False
    lists_volumes = False

    def import_image(self, name: str, source: Path) -> Path:
        return source

    def create_empty(self, name: str, dest: Path, size_gib: int) -> Path:
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest), f"{size_gib}G"])
        return dest

    def clone(self, source: str, source_path: Path, name: str, dest: Path, size_gib: int) -> Path:
        create_overlay(source_path, dest, size_gib)
        return dest

    def freeze(self, name: str, path: Path) -> None:
        path.chmod(0o444)

    def commit(self, name: str, path: Path) -> None:
        run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(path)])
        path.chmod(0o444)

    def destroy(self, name: str, path: Path, dest: Path | None) -> None:
        for f in (path, dest):
            if f is None or f == Path():
                continue
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    def size(self, name: str, path: Path) -> int:
        try:
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def names(self) -> set[str]:
        return set()  # its files live in their owners' directories, reaped with them
