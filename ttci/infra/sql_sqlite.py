"""The SQLite backend of ttci/infra/sql.py: one connection for writes and transactions, under a
lock, and one read-only connection per thread for lone SELECTs; the secrets-at-rest rules of
ttci/infra/db.py (the file and its WAL are born 0600 in a 0700 folder).

Why readers: under many concurrent API reads, every statement on the shared connection queued
behind the lock while its holder waited for the GIL to come back from SQLite (the sqlite3
module gives the GIL up around each step, so a 100-row page hands it over 100 times). WAL lets
readers run beside the one writer; a reader sees what is committed, as a lone statement on the
shared connection did. Statements inside a transaction stay on the shared connection, so a
transaction reads its own writes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttci.infra.db import PRIVATE_FILE, private_dir, private_files
from ttci.infra.sql_backends import (
    Conn,
    DatabaseUnavailable,
    IntegrityError,
    Mutexes,
    Result,
    migrate_all,
    result_of,
)

if TYPE_CHECKING:
    from ttci.infra.sql import Database, Migration

__all__ = ["SqliteBackend"]


class _ReaderConn(sqlite3.Connection):
    """A read-only connection (a subclass: sqlite3.Connection itself takes no weak reference),
    with the lock its thread holds while it uses it: close() takes that lock first, because
    closing a connection while another thread steps one of its statements crashes the process."""

    guard: threading.Lock


class _Readers:
    """One read-only connection per thread for statements outside a transaction.

    WAL lets readers run beside the one writer, so a lone SELECT waits neither for the writer's
    lock nor for other readers: under many concurrent API reads, a query on the shared connection
    queues behind each statement whose thread is waiting for the GIL to come back from SQLite.
    A reader sees what is committed, as a lone statement on the shared connection does."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._all: weakref.WeakSet[_ReaderConn] = weakref.WeakSet()
        self._guard = threading.Lock()
        self._closed = False

    def conn(self) -> _ReaderConn:
        """This thread's reader; hold its `guard` while using it."""
        conn: _ReaderConn | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._guard:
                if self._closed:
                    raise sqlite3.ProgrammingError("closed")
                conn = sqlite3.connect(
                    self._path,
                    timeout=10,
                    isolation_level=None,
                    check_same_thread=False,  # close() runs on another thread
                    factory=_ReaderConn,
                )
                conn.guard = threading.Lock()
                conn.execute("PRAGMA query_only=ON")
                self._all.add(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every reader once its thread is done with it (a reader still busy after 10 s
        is left to close with its thread)."""
        with self._guard:
            self._closed = True
            busy = list(self._all)
        for conn in busy:
            if conn.guard.acquire(timeout=10):
                try:
                    conn.close()
                finally:
                    conn.guard.release()


def _is_read(sql: str) -> bool:
    return sql.lstrip()[:6].lower() == "select"


class SqliteBackend:
    dialect = "sqlite"

    def __init__(self, path: Path, fast_commit: bool = False) -> None:
        private_dir(path.parent)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))  # never born 0644
        private_files(path)  # and its WAL files, before SQLite copies the mode to new ones
        self.conn = sqlite3.connect(path, check_same_thread=False, timeout=10, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        if fast_commit:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        private_files(path)
        self.shown = str(path)
        self._lock = threading.RLock()
        self._readers = _Readers(path)
        self._mutexes = Mutexes()
        self._pks: dict[str, tuple[str, ...]] = {}

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """A closed connection's error as ours: the service is stopping."""
        try:
            yield
        except sqlite3.ProgrammingError as e:
            raise DatabaseUnavailable(f"the database {self.shown} is closed") from e

    def begin(self, exclusive: bool = False) -> Conn:
        self._lock.acquire()
        try:
            with self._open():
                self.conn.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
        except BaseException:
            self._lock.release()
            raise
        return self.conn

    def begin_read(self) -> Conn:
        """A read-only transaction on this thread's reader: one committed state for all its
        statements, without the writer's lock."""
        with self._open():
            conn = self._readers.conn()
        conn.guard.acquire()  # released by end()
        try:
            with self._open():
                conn.execute("BEGIN")
        except BaseException:
            conn.guard.release()
            raise
        return conn

    def end(self, conn: Conn, commit: bool) -> None:
        if isinstance(conn, _ReaderConn):  # a reader's (begin_read): nothing to keep
            try:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            finally:
                conn.guard.release()
            return
        try:
            if commit:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    conn.execute("ROLLBACK")
                    raise
            else:
                conn.execute("ROLLBACK")
        finally:
            self._lock.release()

    def run(self, conn: Conn, sql: str, params: Sequence[Any]) -> Result:
        try:
            return result_of(conn.execute(sql, params))
        except sqlite3.IntegrityError as e:
            raise IntegrityError(f"the database refused the write: {e}") from e

    def run_alone(self, sql: str, params: Sequence[Any]) -> Result:
        if _is_read(sql):
            with self._open():
                reader = self._readers.conn()
                with reader.guard:
                    return self.run(reader, sql, params)
        with self._lock:  # autocommit: the statement is its own transaction
            return self.run(self.conn, sql, params)

    def run_many(self, conn: Conn, sql: str, rows: list[Sequence[Any]]) -> None:
        try:
            conn.executemany(sql, rows)
        except sqlite3.IntegrityError as e:
            raise IntegrityError(f"the database refused the write: {e}") from e

    def table_names(self, db: Database) -> list[str]:
        rows = db.execute("select name from sqlite_master where type = 'table'").fetchall()
        return [r[0] for r in rows]

    def columns_of(self, db: Database, table: str) -> list[str]:
        return [r[1] for r in db.execute(f"pragma table_info({table!r})").fetchall()]

    def primary_key(self, db: Database, table: str) -> tuple[str, ...]:
        if table not in self._pks:
            info = db.execute(f"pragma table_info({table!r})").fetchall()
            keys = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
            if not keys:
                return ("rowid",)
            self._pks[table] = keys
        return self._pks[table]

    @contextlib.contextmanager
    def mutex(self, name: str) -> Iterator[None]:
        with self._mutexes.get(name):
            yield

    def listen(self, channel: str, fn: Callable[[str], None]) -> None:
        """One process: its own events reach its watchers directly."""

    def migrate(self, db: Database, migrations: list[Migration]) -> None:
        with db.transaction(exclusive=True):  # BEGIN IMMEDIATE: one process migrates
            migrate_all(db, migrations)

    def close(self) -> None:
        self._readers.close()
        with self._lock:
            self.conn.close()
