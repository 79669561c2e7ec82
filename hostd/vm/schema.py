"""hostd's state schema: the named migrations of its SQLite database (VMs, networks, templates)."""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from hostd.net.manager import NetManager
from hostd.vm.templates import migrations as template_migrations

__all__ = ["migrations"]


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
        *template_migrations(),
    ]
