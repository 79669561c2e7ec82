"""SQLite through sqlite-utils with named migrations recorded in the database.

One connection per database, shared by a service's threads under a lock (`Store.lock`).

The databases hold secrets (hostd tokens, per-VM agent tokens, digests of user tokens), so a
Store keeps its directory private (0700) and its files (the database, its WAL and shared
memory) readable by their owner only (0600): made so, and tightened at every start when an
older version (or an operator) left them more open. A directory shared with others (sticky, like
/tmp, or not ours) is left alone with a warning: state belongs in a directory of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "Migration",
    "Store",
    "now",
    "private_dir",
    "private_files",
]

Migration = tuple[str, Callable[[sqlite_utils.Database], None]]
log = logging.getLogger("ttci.infra.db")
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_SIDE_FILES = ("-wal", "-shm", "-journal")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _tighten(path: Path, mode: int) -> None:
    """Take from path every permission beyond mode (when it is ours to change)."""
    st = path.stat()
    old = stat.S_IMODE(st.st_mode)
    if not old & ~mode:
        return
    if st.st_uid != os.geteuid() or (stat.S_ISDIR(st.st_mode) and old & stat.S_ISVTX):
        log.warning(
            "%s is mode %04o and shared (not ours, or sticky): secrets kept there are exposed; "
            "give the state a directory of its own",
            path,
            old,
        )
        return
    path.chmod(old & mode)
    log.warning("%s was mode %04o; now %04o (it holds secrets)", path, old, old & mode)


def private_dir(path: Path) -> Path:
    """path as a directory only its owner may use: made 0700, or tightened to it."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    _tighten(path, PRIVATE_DIR)
    return path


def private_files(path: Path) -> None:
    """A SQLite file and its WAL files readable by their owner only (see the docstring)."""
    for p in (path, *(path.with_name(path.name + s) for s in _SIDE_FILES)):
        if p.exists():
            _tighten(p, PRIVATE_FILE)


class Store:
    def __init__(self, path: Path, migrations: list[Migration]) -> None:
        private_dir(path.parent)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))  # never born 0644
        private_files(path)  # and its WAL files, before SQLite copies the mode to new ones
        conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        private_files(path)
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

    def writable(self) -> str:
        """The database takes a write (a row in `_ready`), in a transaction."""
        with self.lock, self.db.conn:
            self.db.execute("create table if not exists _ready (id integer primary key, at text)")
            self.db.execute("insert or replace into _ready (id, at) values (1, ?)", [now()])
        return "writable"

    def applied(self) -> list[str]:
        with self.lock:
            return [r["name"] for r in self.db.table("_migrations").rows]
