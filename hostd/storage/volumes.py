"""hostd's volumes: every disk a storage backend makes, recorded before it is made.

`Volumes` is what the VM manager, the templates and the caches use. Each volume has a row in
hostd's state (name, kind, owner, the frozen volume it was cloned from, state, paths) written
*before* the backend makes it, so a hostd killed half-way leaves nothing `reconcile` does not
remove. A volume others were cloned from is only destroyed when its last clone is gone: until
then it is `doomed` and `sweep` retries it.

Owners are `KIND:ID` strings (`vm:ID`, `template:ID`, `image:NAME`, `cache:...`); at a restart
`reconcile` asks the caller which owners still exist and destroys the volumes of the others.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

from hostd.storage.base import (
    DISK_FILE,
    Backend,
    StorageBusy,
    StorageError,
    check_name,
    parse_storage,
)
from hostd.storage.qcow2 import Qcow2Backend
from hostd.storage.reflink import ReflinkBackend
from hostd.storage.zfs import ZfsBackend
from ttci.infra.db import Store, now
from ttci.model.errors import TTError

__all__ = [
    "DISK_FILE",
    "Volumes",
    "image_volume",
    "make_backend",
    "template_volume",
    "vm_volume",
]

log = logging.getLogger("hostd.storage.volumes")


def make_backend(text: str) -> Backend:
    """The backend `--storage` names (qcow2, zfs:POOL/DATASET, reflink:DIR); BadInput for
    anything else."""
    kind, arg = parse_storage(text)
    if kind == "zfs":
        return ZfsBackend(arg)
    return ReflinkBackend(arg) if kind == "reflink" else Qcow2Backend()


def image_volume(digest: str) -> str:
    """The name of an image's frozen volume, from its build digest (names stay valid ZFS)."""
    return check_name(f"img-{digest}")


def vm_volume(vm_id: str) -> str:
    """The name of a VM's disk volume."""
    return check_name(f"vm-{vm_id}")


def template_volume(template_id: str, selftest: int | None = None) -> str:
    """The name of a template's frozen disk, or of its n-th restore self-test clone's disk."""
    return check_name(f"tpl-{template_id}" + (f"-st{selftest}" if selftest is not None else ""))


class Volumes:
    """The recorded volumes of one hostd on one backend. Thread-safe."""

    def __init__(self, store: Store, backend: Backend) -> None:
        self.store = store
        self.backend = backend
        self._import_lock = threading.Lock()
        self._others: dict[str, Backend] = {}

    @classmethod
    def recorded(cls, store: Store) -> Volumes:
        """The volumes recorded in store, on the backend hostd last made them with (the CLI on
        the host: `tt image prune`)."""
        with store.lock:
            row = store.db.execute(
                "select backend from volumes order by created_at desc"
            ).fetchone()
        return cls(store, make_backend(row[0] if row else "qcow2"))

    def _backend_of(self, row: dict[str, Any]) -> Backend:
        """The backend that made row (hostd may have been restarted with another one)."""
        text = row.get("backend") or self.backend.describe()
        if text == self.backend.describe():
            return self.backend
        if text not in self._others:
            self._others[text] = make_backend(text)
        return self._others[text]

    @property
    def kind(self) -> str:
        return self.backend.kind

    @staticmethod
    def migrations() -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
        def volumes(db: sqlite_utils.Database) -> None:
            db.table("volumes").create(
                {
                    "name": str,
                    "kind": str,  # image, vm, template, cache
                    "owner": str,  # KIND:ID
                    "source": str,  # the frozen volume it was cloned from ("" when none)
                    "state": str,  # creating, ready, frozen, doomed
                    "path": str,  # the disk file
                    "dest": str,  # where its owner reaches it (the file, or a link to it)
                    "backend": str,  # the backend that made it (qcow2, zfs:POOL/DATASET)
                    "created_at": str,
                },
                pk="name",
            )

        return [("0005_volumes", volumes)]

    # -- state -------------------------------------------------------------------------------
    def rows(self, where: str | None = None, args: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("volumes").rows_where(where, args or []))

    def get(self, name: str) -> dict[str, Any] | None:
        rows = self.rows("name = ?", [name])
        return rows[0] if rows else None

    def path(self, name: str) -> Path:
        row = self.get(name)
        if row is None or row["state"] not in ("ready", "frozen"):
            raise StorageError(f"no volume {name} on this host", hint="it is not made, or gone")
        return Path(row["path"])

    def _set(self, name: str, **fields: Any) -> None:
        with self.store.lock:
            self.store.db.table("volumes").update(name, fields)

    def _record(self, name: str, kind: str, owner: str, source: str, dest: Path | None) -> None:
        with self.store.lock:
            if self.get(check_name(name)) is not None:
                raise StorageError(f"volume {name} exists", hint="pick a new name")
            self.store.db.table("volumes").insert(
                {
                    "name": name,
                    "kind": kind,
                    "owner": owner,
                    "source": source,
                    "state": "creating",
                    "path": "",
                    "dest": str(dest) if dest else "",
                    "backend": self.backend.describe(),
                    "created_at": now(),
                }
            )

    def _made(self, name: str, make: Callable[[], Path], state: str = "ready") -> Path:
        """Run make (the backend's step); on failure remove what it left and the row."""
        try:
            path = make()
        except BaseException:
            with contextlib.suppress(TTError):
                self._destroy_row(self.get(name) or {"name": name, "path": "", "dest": ""})
            raise
        self._set(name, path=str(path), state=state)
        return path

    # -- make --------------------------------------------------------------------------------
    def image(self, name: str, source: Path) -> str:
        """The frozen volume of an image's disk (imported once, the first time it is asked for);
        returns its name."""
        with self._import_lock:
            row = self.get(name)
            if row is not None and row["state"] in ("frozen", "doomed"):
                if row["state"] == "doomed":  # wanted again before it went: it stays
                    self._set(name, state="frozen")
                return name
            if row is not None:  # half made
                self._destroy_row(row)
            self._record(name, "image", f"image:{name}", "", None)
            self._made(name, lambda: self.backend.import_image(name, source), "frozen")
            return name

    def clone(
        self, source: str, name: str, *, kind: str, owner: str, dest: Path, size_gib: int
    ) -> Path:
        """A writable copy-on-write clone of the frozen volume source, at dest."""
        src = self.get(source)
        if src is None or src["state"] != "frozen":
            raise StorageError(f"volume {source} is not a frozen volume", hint="freeze it first")
        self._record(name, kind, owner, source, dest)
        return self._made(
            name, lambda: self.backend.clone(source, Path(src["path"]), name, dest, size_gib)
        )

    def create_empty(self, name: str, *, kind: str, owner: str, dest: Path, size_gib: int) -> Path:
        """A new writable volume with an empty disk of size_gib, at dest."""
        self._record(name, kind, owner, "", dest)
        return self._made(name, lambda: self.backend.create_empty(name, dest, size_gib))

    def freeze(self, name: str) -> None:
        """Read-only from now on, and clonable (a template's disk)."""
        self.backend.freeze(name, self.path(name))
        self._set(name, state="frozen")

    def commit(self, name: str) -> None:
        """Freeze, and no longer depend on the volume it came from (a cache version)."""
        self.backend.commit(name, self.path(name))
        self._set(name, state="frozen", source="")

    # -- remove ------------------------------------------------------------------------------
    def _clones(self, name: str) -> int:
        with self.store.lock:
            return int(self.store.db.table("volumes").count_where("source = ?", [name]))

    def destroy(self, name: str) -> bool:
        """Destroy a volume (missing: nothing to do). False when clones of it still exist: it is
        doomed and destroyed by `sweep` once they are gone."""
        row = self.get(name)
        if row is None:
            return True
        if self._clones(name):
            self._set(name, state="doomed")
            return False
        try:
            self._destroy_row(row)
        except TTError as e:  # busy (clones), or the backend failed: retried by sweep
            if not isinstance(e, StorageBusy):
                log.warning("volume %s not destroyed: %s", name, e)
            self._set(name, state="doomed")
            return False
        self.sweep()
        return True

    def _destroy_row(self, row: dict[str, Any]) -> None:
        path, dest = Path(row["path"]) if row["path"] else None, row["dest"]
        backend = self._backend_of(row)
        if row.get("kind") != "image" or backend.owns_imports:
            backend.destroy(row["name"], path or Path(), Path(dest) if dest else None)
        with self.store.lock:
            self.store.db.table("volumes").delete_where("name = ?", [row["name"]])

    def sweep(self) -> int:
        """Destroy doomed volumes whose clones are gone; returns how many went."""
        gone = 0
        progress = True
        while progress:
            progress = False
            for row in self.rows("state = 'doomed'"):
                if self._clones(row["name"]):
                    continue
                try:
                    self._destroy_row(row)
                except StorageBusy:
                    continue
                except TTError as e:
                    log.warning("volume %s not destroyed: %s", row["name"], e)
                    continue
                gone += 1
                progress = True
        return gone

    def prune_images(self, current: set[str]) -> list[str]:
        """`tt image prune`: destroy image volumes no clone uses (imported again when next
        needed); those of images not in current (gone, rebuilt) go once their last clone does.
        Returns the names destroyed now."""
        gone = []
        for row in self.rows("kind = 'image'"):
            if row["name"] in current and self._clones(row["name"]):
                continue
            if self.destroy(row["name"]):
                gone.append(row["name"])
        return gone

    # -- accounting --------------------------------------------------------------------------
    def size(self, name: str) -> int:
        row = self.get(name)
        if row is None or not row["path"]:
            return 0
        backend = self._backend_of(row)
        if row["kind"] == "image" and not backend.owns_imports:
            return 0  # the image's own file: the image catalogue's space
        return backend.size(name, Path(row["path"]))

    def used_bytes(self, kinds: tuple[str, ...] = ("image", "vm", "template", "cache")) -> int:
        marks = ",".join("?" * len(kinds))
        return sum(self.size(r["name"]) for r in self.rows(f"kind in ({marks})", list(kinds)))

    # -- restart -----------------------------------------------------------------------------
    def reconcile(self, alive: Mapping[str, Callable[[str], bool]]) -> dict[str, int]:
        """After a start: volumes half made go; so do those whose owner is gone (alive: owner
        kind -> is this id still there; kinds not listed are kept) and what the backend holds
        that no row names; rows of volumes gone from the backend are forgotten."""
        counts = {"volumes_cleaned": 0, "volumes_reaped": 0, "volumes_forgotten": 0}
        for row in self.rows():
            kind, _, oid = row["owner"].partition(":")
            dead = kind in alive and not alive[kind](oid)
            if row["state"] == "creating" or dead:
                self._set(row["name"], state="doomed")
                counts["volumes_cleaned"] += 1
        self.sweep()
        held = self.backend.names()
        for row in self.rows(
            "state in ('ready', 'frozen') and backend = ?", [self.backend.describe()]
        ):
            if self.backend.lists_volumes and row["name"] not in held:  # removed by hand
                log.warning("forgetting volume %s: it is gone", row["name"])
                with self.store.lock:
                    self.store.db.table("volumes").delete_where("name = ?", [row["name"]])
                counts["volumes_forgotten"] += 1
        known = {r["name"] for r in self.rows()}
        for name in held - known:
            log.warning("reaping volume %s that no state row owns", name)
            try:
                self.backend.destroy(name, Path(), None)
                counts["volumes_reaped"] += 1
            except StorageError as e:
                log.warning("volume %s not reaped: %s", name, e)
        return counts
