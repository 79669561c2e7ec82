"""The reflink backend (`--storage reflink:DIR`): volumes are files in DIR, on a file system that
shares blocks between copies (btrfs; XFS made with reflink=1).

An image is copied into DIR once; a VM's or template's disk is a reflink copy of its source's file
(`cp --reflink=always`: instant, blocks shared until written; `dest` is a link to it), so unlike a
qcow2 overlay it never depends on its source: freezing and committing only make it read-only.
Everything in DIR named `*.qcow2` is TT's: a file no row of hostd's state names is reaped.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from hostd.storage.base import Backend, grow_disk, link_disk
from ttci.infra.proc import run
from ttci.model.errors import BadInput, CommandFailed

__all__ = ["ReflinkBackend"]

_CLAIM = ".ttci-state"  # which hostd (state dir) owns DIR


class ReflinkBackend(Backend):
    kind = "reflink"

    def __init__(self, directory: str) -> None:
        self.root = Path(directory)

    def describe(self) -> str:
        return f"reflink:{self.root}"

    def check(self) -> None:
        if not self.root.is_dir():
            raise BadInput(
                f"--storage reflink:{self.root}: no such directory",
                hint=f"mkdir -p {self.root} on a btrfs (or XFS reflink=1) file system",
            )
        self.root.chmod(0o700)  # VM disks hold jobs' data: root's only, as hostd's state dir
        probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"tt")
            run(["cp", "--reflink=always", str(probe), f"{probe}.copy"])
        except CommandFailed:
            raise BadInput(
                f"--storage reflink:{self.root}: its file system cannot share blocks between "
                "copies",
                hint="use a directory on btrfs or on XFS made with reflink=1 (or --storage qcow2)",
            ) from None
        finally:
            for f in (probe, Path(f"{probe}.copy")):
                f.unlink(missing_ok=True)

    def claim(self, owner: str) -> None:
        mark = self.root / _CLAIM
        got = mark.read_text().strip() if mark.exists() else ""
        if got not in ("", owner):
            raise BadInput(
                f"--storage reflink:{self.root} belongs to the hostd with state dir {got}",
                hint=f"give each hostd a directory of its own, or, if that hostd is gone for "
                f"good: rm {mark}",
            )
        mark.write_text(owner + "\n")

    def release(self, owner: str) -> None:
        mark = self.root / _CLAIM
        if mark.exists() and mark.read_text().strip() == owner:
            mark.unlink()

    def _file(self, name: str) -> Path:
        return self.root / f"{name}.qcow2"

    def import_image(self, name: str, source: Path) -> Path:
        disk = self._file(name)
        run(["cp", "--reflink=auto", str(source), str(disk)])  # another file system: a copy
        disk.chmod(0o444)
        return disk

    def create_empty(self, name: str, dest: Path, size_gib: int) -> Path:
        disk = self._file(name)
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{size_gib}G"])
        link_disk(dest, disk)
        return disk

    def clone(self, source: str, source_path: Path, name: str, dest: Path, size_gib: int) -> Path:
        disk = self._file(name)
        run(["cp", "--reflink=always", str(source_path), str(disk)])
        disk.chmod(0o644)
        grow_disk(disk, size_gib)
        link_disk(dest, disk)
        return disk

    def freeze(self, name: str, path: Path) -> None:
        path.chmod(0o444)

    def commit(self, name: str, path: Path) -> None:
        path.chmod(0o444)  # a reflink copy never depended on its source

    def destroy(self, name: str, path: Path, dest: Path | None) -> None:
        if dest is not None and dest.is_symlink():
            dest.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def size(self, name: str, path: Path) -> int:
        try:
            return os.stat(path).st_blocks * 512  # shared blocks counted in full: an upper bound
        except FileNotFoundError:
            return 0

    def names(self) -> set[str]:
        return {f.stem for f in self.root.glob("*.qcow2")}
