"""hostd's state schema: the named migrations of its SQLite database (VMs, networks, templates,
volumes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from hostd.cache.store import migrations as cache_migrations
from hostd.net.manager import NetManager
from hostd.storage.volumes import Volumes
from ttci.infra.db import Store

__all__ = ["migrations", "open_store"]


def migrations() -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
    def vms(db: sqlite_utils.Database) -> None:
        db.table("vms").create(
            {
                "id": str,
                "env": str,
                "name": str,
                "owner": str,
                "image": str,
                "arch": str,
                "cpus": float,
                "memory_mib": int,
                "disk_gib": int,
                "domain": str,
                "workdir": str,
                "token": str,
                "accel": str,
                "state": str,
                "error": str,
                "boot_s": float,
                "created_at": str,
            },
            pk="id",
        )

    def guest_boot(db: sqlite_utils.Database) -> None:
        db.table("vms").add_column("guest_boot_s", float, not_null_default=0.0)

    return [
        ("0001_vms", vms),
        ("0002_guest_boot_s", guest_boot),
        *NetManager.migrations(),
        *_template_migrations(),
        *Volumes.migrations(),
        *cache_migrations(),
    ]


def _template_migrations() -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
    def templates(db: sqlite_utils.Database) -> None:
        db.table("templates").create(
            {
                "id": str,
                "key": str,
                "image": str,
                "image_digest": str,
                "arch": str,
                "vcpus": int,
                "memory_mib": int,
                "disk_gib": int,
                "accel": str,
                "qemu": int,
                "state": str,  # building, ready, failed, stale
                "dir": str,
                "domain": str,
                "token": str,
                "bytes": int,
                "boot_s": float,
                "error": str,
                "hits": int,
                "created_at": str,
            },
            pk="id",
        )
        db.table("restore_tests").create(
            {
                "target": str,  # ARCH/qemu-VERSION/ACCEL
                "arch": str,
                "qemu": int,
                "accel": str,
                "ok": int,
                "passed": int,
                "tries": int,
                "detail": str,
                "restore_s": float,
                "tested_at": str,
            },
            pk="target",
        )
        vms = db.table("vms")
        vms.add_column("start", str, not_null_default="cold")
        vms.add_column("template", str, not_null_default="")
        vms.add_column("warm_why", str, not_null_default="")

    return [("0004_templates", templates)]


def open_store(state_dir: Path) -> Store:
    """hostd's database in state_dir, migrated (the VM manager's, and the CLI's when it reads
    or prunes hostd's templates on the host)."""
    return Store(state_dir / "hostd.db", migrations())
