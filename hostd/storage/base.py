"""The storage backend interface: the few disk operations hostd and its caches need.

A *volume* is one disk file QEMU opens, named by hostd (`vm-ID`, `tpl-ID`, `img-KEY`, cache
names). Backends only do the mechanics; hostd/storage/volumes.py records every volume in hostd's
state before it is made and decides when one may go. Every disk file is qcow2.

- `import_image`: the image's disk as a frozen volume others are cloned from (qcow2: the image's
  own file; ZFS: a dataset holding a copy of it, snapshotted once).
- `create_empty` / `clone`: a writable volume (empty, or a copy-on-write clone of a frozen one),
  reachable at `dest` (the file itself, or a link to it).
- `freeze`: the volume is read-only from now on and can be cloned (a template's disk).
- `commit`: freeze, and no longer depend on the volume it was cloned from (a cache version).
- `destroy`, `size`, `names` (what the backend holds, for reaping).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

from ttci.infra.proc import run
from ttci.model.errors import BadInput, TTError

__all__ = [
    "DISK_FILE",
    "Backend",
    "StorageBusy",
    "StorageError",
    "check_name",
    "grow_disk",
    "link_disk",
    "parse_storage",
]

DISK_FILE = "disk.qcow2"
_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,99}\Z")
_DATASET_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9][A-Za-z0-9_.:-]*)+\Z")


class StorageError(TTError):
    """A storage operation failed."""


class StorageBusy(StorageError):
    """A volume cannot go yet: clones still depend on it."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise StorageError(
            f"volume name {name!r} is not valid",
            hint="1-100 lowercase letters, digits, '.', '_' or '-'",
        )
    return name


class Backend(ABC):
    """One way of making disks. Paths are the disk files; `dest` is where the owner wants it."""

    kind: str = ""
    owns_imports: bool = True  # False: an imported image is the image's own file (not ours)
    lists_volumes: bool = True  # names() is every volume it holds (qcow2: its files are elsewhere)

    def describe(self) -> str:
        return self.kind

    def check(self) -> None:  # noqa: B027 - nothing to check for most backends
        """Raise BadInput saying how to fix the host if this backend cannot work here."""

    def claim(self, owner: str) -> None:  # noqa: B027 - only shared places need claiming
        """Mark the backend's place as owner's (a hostd's state dir); BadInput if another
        hostd's: it would reap what the other made."""

    def release(self, owner: str) -> None:  # noqa: B027 - only shared places are claimed
        """Undo owner's claim (a hostd stopped with no VM left); another hostd may then claim
        the place (and reap what this one left in it)."""

    @abstractmethod
    def import_image(self, name: str, source: Path) -> Path:
        """A frozen volume holding a copy of source (or source itself); returns its disk file."""

    @abstractmethod
    def create_empty(self, name: str, dest: Path, size_gib: int) -> Path:
        """A new writable volume with an empty qcow2 disk of size_gib; returns its disk file."""

    @abstractmethod
    def clone(self, source: str, source_path: Path, name: str, dest: Path, size_gib: int) -> Path:
        """A writable copy-on-write clone of the frozen volume source (its disk: source_path),
        grown to size_gib if that is larger; returns its disk file."""

    @abstractmethod
    def freeze(self, name: str, path: Path) -> None:
        """Make the volume read-only and clonable."""

    @abstractmethod
    def commit(self, name: str, path: Path) -> None:
        """Freeze, and stop depending on the volume it was cloned from."""

    @abstractmethod
    def destroy(self, name: str, path: Path, dest: Path | None) -> None:
        """Remove the volume (and dest, a link to it); missing is fine.

        Raises:
            StorageBusy: clones still depend on it.
        """

    @abstractmethod
    def size(self, name: str, path: Path) -> int:
        """Bytes the volume takes on this host."""

    @abstractmethod
    def names(self) -> set[str]:
        """The volumes this backend holds itself (reaped when no record owns them)."""


def parse_storage(text: str) -> tuple[str, str]:
    """`qcow2`, `zfs:POOL/DATASET` or `reflink:DIR` -> (kind, argument), or BadInput saying
    what works."""
    kind, _, arg = text.strip().partition(":")
    if kind == "qcow2" and not arg:
        return "qcow2", ""
    if kind == "zfs":
        if not _DATASET_RE.match(arg):
            raise BadInput(
                f"--storage {text!r}: {arg!r} is not POOL/DATASET",
                hint="e.g. --storage zfs:tank/tt (a dataset of its own: TT owns what is in it)",
            )
        return "zfs", arg
    if kind == "reflink":
        if not arg.startswith("/"):
            raise BadInput(
                f"--storage {text!r}: {arg!r} is not an absolute directory",
                hint="e.g. --storage reflink:/srv/tt (on btrfs, or XFS made with reflink=1)",
            )
        return "reflink", arg
    raise BadInput(
        f"--storage {text!r} is not a storage backend TT knows",
        hint="use qcow2 (the default), zfs:POOL/DATASET or reflink:DIR",
    )


def grow_disk(disk: Path, size_gib: int) -> None:
    """Grow a cloned qcow2 disk to size_gib when that is more than its virtual size."""
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U", str(disk)]).stdout)
    if size_gib << 30 > int(info["virtual-size"]):
        run(["qemu-img", "resize", "-q", "-f", "qcow2", str(disk), f"{size_gib}G"])


def link_disk(dest: Path, disk: Path) -> None:
    """dest, where the owner looks for its disk, points at the volume's file elsewhere."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    os.symlink(disk, dest)
