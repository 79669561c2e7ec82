"""SQLite through sqlite-utils with named migrations recorded in the database.

One connection per database, shared by a service's threads under a lock (`Store.lock`).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

__all__ = ["Migration", "Store", "now"]

Migration = tuple[str, Callable[[sqlite_utils.Database], None]]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Store:
    def __init__(self, path: Path, migrations: list[Migration]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        self.db = sqlite_utils.Database(conn, use_counts_table=False)
        self.lock = threading.RLock()
        self._migrate(migrations)

    def _migrate(self, migrations: list[Migration]) -> None:
        table = self.db.table("_migrations")
        if not table.exists():
            table.create({"name": str, "applied_at": str}, pk="name")
        done = {r["name"] for r in table.rows}
        for name, fn in migrations:
            if name not in done:
                with self.db.conn:
                    fn(self.db)
                    table.insert({"name": name, "applied_at": now()})

    def applied(self) -> list[str]:
        with self.lock:
            return [r["name"] for r in self.db.table("_migrations").rows]
