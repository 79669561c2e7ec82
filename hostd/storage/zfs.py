"""The ZFS backend (`--storage zfs:POOL/DATASET`): volumes are datasets under DATASET.

An image is imported once: a dataset holding a copy of its disk file, snapshotted `@NAME` and
set read-only. A VM's disk is a clone of that snapshot (the file inside the cloned dataset: no
zvols, which zfs-fuse lacks; `dest` is a link to it); a template's disk is frozen by a snapshot;
a cache commit snapshots and promotes its clone, so older versions can be destroyed. Everything
under DATASET is TT's: a dataset no row of hostd's state names is reaped at restart.

`zfs`/`zpool` are driven through the one process runner with parsable output (`-H`, `-p`), the
way TT did; not `pyzfs` (see the README): its PyPI package wraps libzfs_core, which zfs-fuse does
not provide, and the commands work the same on kernel OpenZFS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from hostd.storage.base import (
    DISK_FILE,
    Backend,
    StorageBusy,
    StorageError,
    grow_disk,
    link_disk,
)
from ttci.infra.proc import need, run
from ttci.model.errors import BadInput, CommandFailed

__all__ = ["ZfsBackend"]

log = logging.getLogger("hostd.storage.zfs")
_CLAIM = "org.ttci:state"  # a user property: which hostd (its state dir) owns the dataset
_MOUNT_WAIT_S = 30.0
_BUSY_TRIES = 50  # a dataset may be busy for a moment after its last file closes (FUSE)


class ZfsBackend(Backend):
    kind = "zfs"

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._mountpoint: Path | None = None

    def describe(self) -> str:
        return f"zfs:{self.dataset}"

    # -- commands ----------------------------------------------------------------------------
    def _zfs(self, *args: str) -> str:
        return run(["zfs", *args], timeout=300).stdout.decode()

    def _ds(self, name: str) -> str:
        return f"{self.dataset}/{name}"

    def check(self) -> None:
        need("zfs")
        pool = self.dataset.split("/")[0]
        got = run(["zpool", "list", "-H", "-o", "name", pool], check=False)
        err = got.stderr.decode(errors="replace").strip()
        if got.returncode and "no such pool" not in err:
            raise BadInput(
                f"--storage zfs:{self.dataset}: ZFS does not answer: {err[-300:]}",
                hint="load kernel OpenZFS (modprobe zfs) or start the zfs-fuse daemon",
            )
        if got.returncode:
            raise BadInput(
                f"--storage zfs:{self.dataset}: there is no ZFS pool {pool}",
                hint=f"create it (zpool create {pool} DEVICE; to try it on a file: truncate -s "
                f"20G /var/lib/ttci/{pool}.img && zpool create {pool} /var/lib/ttci/{pool}.img), "
                f"then zfs create -p {self.dataset}",
            )
        got = run(
            ["zfs", "get", "-H", "-o", "value", "mountpoint,mounted", self.dataset], check=False
        )
        if got.returncode:
            raise BadInput(
                f"--storage zfs:{self.dataset}: pool {pool} has no dataset {self.dataset}",
                hint=f"create it: zfs create -p {self.dataset} (TT owns everything in it)",
            )
        mountpoint, mounted = got.stdout.decode().split("\n")[:2]
        if not mountpoint.startswith("/") or mounted != "yes":
            raise BadInput(
                f"--storage zfs:{self.dataset}: the dataset is not mounted ({mountpoint})",
                hint=f"zfs set mountpoint=/var/lib/ttci/zfs {self.dataset} && zfs mount "
                f"{self.dataset}",
            )
        self._mountpoint = Path(mountpoint)
        os.chmod(mountpoint, 0o700)  # VM disks hold jobs' data: root's only, as hostd's state dir
        # Shared: the datasets mounted under it from now on also appear in mount namespaces
        # made after this as slaves (a private libvirtd's, hostd/vm/libvirtd.py).
        run(["mount", "--make-shared", mountpoint])

    def claim(self, owner: str) -> None:
        prop = _CLAIM
        got = self._zfs("get", "-H", "-o", "value", prop, self.dataset).strip()
        if got not in ("-", "", owner):
            raise BadInput(
                f"--storage zfs:{self.dataset} belongs to the hostd with state dir {got}",
                hint=f"give each hostd a dataset of its own (zfs create -p {self.dataset}2), or, "
                f"if that hostd is gone for good: zfs inherit {prop} {self.dataset}",
            )
        if got != owner:
            self._zfs("set", f"{prop}={owner}", self.dataset)

    def release(self, owner: str) -> None:
        got = self._zfs("get", "-H", "-o", "value", _CLAIM, self.dataset).strip()
        if got == owner:
            self._zfs("inherit", _CLAIM, self.dataset)

    def _mnt(self, name: str) -> Path:
        if self._mountpoint is None:
            self.check()
        assert self._mountpoint is not None  # noqa: S101 - check() set it or raised
        return self._mountpoint / name

    def _mounted(self, name: str) -> Path:
        """The new dataset's mountpoint once it is mounted: a file written before would land in
        the directory under it and be hidden (zfs-fuse may mount after create returns)."""
        mnt = self._mnt(name)
        deadline = time.monotonic() + _MOUNT_WAIT_S
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline:
                raise StorageError(
                    f"ZFS dataset {self._ds(name)} is not mounted at {mnt}",
                    hint=f"check `zfs get mounted,mountpoint {self._ds(name)}`",
                )
            time.sleep(0.01)
        return mnt

    # -- make --------------------------------------------------------------------------------
    def import_image(self, name: str, source: Path) -> Path:
        self._zfs("create", self._ds(name))
        disk = self._mounted(name) / DISK_FILE
        shutil.copyfile(source, disk)
        disk.chmod(0o644)
        self.freeze(name, disk)
        return disk

    def create_empty(self, name: str, dest: Path, size_gib: int) -> Path:
        self._zfs("create", self._ds(name))
        disk = self._mounted(name) / DISK_FILE
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{size_gib}G"])
        link_disk(dest, disk)
        return disk

    def clone(self, source: str, source_path: Path, name: str, dest: Path, size_gib: int) -> Path:
        snap = f"{self._ds(source)}@{source}"
        got = run(["zfs", "clone", snap, self._ds(name)], check=False)
        if got.returncode:  # a promote moved the snapshot to a newer version's dataset
            self._zfs("clone", self._snapshot_of(source), self._ds(name))
        disk = self._mounted(name) / DISK_FILE
        disk.chmod(0o644)  # a template's frozen file may be read-only; its clone is not
        grow_disk(disk, size_gib)
        link_disk(dest, disk)
        return disk

    def _snapshot_of(self, source: str) -> str:
        for snap in self._zfs(
            "list", "-H", "-o", "name", "-t", "snapshot", "-r", self.dataset
        ).split():
            if snap.endswith(f"@{source}"):
                return snap
        raise StorageError(f"ZFS volume {source} has no snapshot", hint="it was never frozen")

    def freeze(self, name: str, path: Path) -> None:
        self._zfs("snapshot", f"{self._ds(name)}@{name}")
        self._zfs("set", "readonly=on", self._ds(name))

    def commit(self, name: str, path: Path) -> None:
        self.freeze(name, path)
        if self._zfs("get", "-H", "-o", "value", "origin", self._ds(name)).strip() not in ("-", ""):
            self._zfs("promote", self._ds(name))

    # -- remove ------------------------------------------------------------------------------
    def destroy(self, name: str, path: Path, dest: Path | None) -> None:
        if dest is not None and dest.is_symlink():
            dest.unlink()
        run(["zfs", "unmount", self._ds(name)], check=False)  # else destroy finds it busy
        for attempt in range(_BUSY_TRIES):
            got = run(["zfs", "destroy", "-r", self._ds(name)], check=False)
            err = got.stderr.decode(errors="replace").strip()
            if got.returncode == 0 or "does not exist" in err:
                break
            if "dependent clones" in err:
                raise StorageBusy(f"ZFS volume {name} still has clones", hint="destroy them first")
            if "busy" not in err or attempt == _BUSY_TRIES - 1:
                raise StorageError(f"zfs destroy {self._ds(name)}: {err}", hint="see zfs(8)")
            time.sleep(0.1)
        for snap in self._zfs(
            "list", "-H", "-o", "name", "-t", "snapshot", "-r", self.dataset
        ).split():
            if snap.endswith(f"@{name}"):  # left behind by a promote: goes with its last clone
                with contextlib.suppress(CommandFailed):
                    self._zfs("destroy", "-d", snap)

    def size(self, name: str, path: Path) -> int:
        got = run(["zfs", "get", "-Hp", "-o", "value", "used", self._ds(name)], check=False)
        text = got.stdout.decode().strip()
        return int(text) if got.returncode == 0 and text.isdigit() else 0

    def names(self) -> set[str]:
        out = self._zfs("list", "-H", "-o", "name", "-r", "-d", "1", self.dataset)
        prefix = self.dataset + "/"
        return {n.removeprefix(prefix) for n in out.split() if n.startswith(prefix)}
