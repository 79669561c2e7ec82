"""The two backends of ttci/infra/sql.py: SQLite (ttci/infra/sql_sqlite.py) and PostgreSQL
(psycopg 3 with a connection pool), and what they share.

Each turns its driver's errors into ours: a key taken twice is IntegrityError; a database that
cannot be reached, went read-only (a standby after a failover) or cut the connection is
DatabaseUnavailable, a retryable error (the API answers 503). A transaction cut short is rolled
back by the server, so nothing half-made stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ttci.infra.db import now
from ttci.model.errors import BadInput, TTError

if TYPE_CHECKING:
    from ttci.infra.sql import Database, Migration

__all__ = [
    "POOL_MAX",
    "POOL_MIN",
    "Backend",
    "Conn",
    "DatabaseUnavailable",
    "IntegrityError",
    "Mutexes",
    "PostgresBackend",
    "Result",
    "lock_key",
    "mask_url",
    "migrate_all",
    "open_backend",
    "result_of",
]

log = logging.getLogger("ttci.infra.sql")
Conn = Any  # a sqlite3.Connection or a psycopg.Connection
POOL_MAX = 32  # PostgreSQL connections per process (the scheduler serves 256 threads)
POOL_MIN = 4


class DatabaseUnavailable(TTError):
    """The database cannot be reached or refused the write (a failover): retry."""


class IntegrityError(TTError):
    """A row with that key exists (e.g. two replicas inserted it at once)."""


def mask_url(url: str) -> str:
    """The URL as logs show it: its password (in the authority or the query) replaced."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else f"{k}={v}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(b"ttci:" + name.encode()).digest()[:8], signed=True)


class Backend(Protocol):
    dialect: str
    shown: str

    def begin(self, exclusive: bool = False) -> Conn: ...
    def begin_read(self) -> Conn: ...
    def end(self, conn: Conn, commit: bool) -> None: ...
    def run(self, conn: Conn, sql: str, params: Sequence[Any]) -> Result: ...
    def run_alone(self, sql: str, params: Sequence[Any]) -> Result: ...
    def run_many(self, conn: Conn, sql: str, rows: list[Sequence[Any]]) -> None: ...
    def table_names(self, db: Database) -> list[str]: ...
    def columns_of(self, db: Database, table: str) -> list[str]: ...
    def primary_key(self, db: Database, table: str) -> tuple[str, ...]: ...
    def mutex(self, name: str) -> contextlib.AbstractContextManager[None]: ...
    def listen(self, channel: str, fn: Callable[[str], None]) -> None: ...
    def migrate(self, db: Database, migrations: list[Migration]) -> None: ...
    def close(self) -> None: ...


def open_backend(
    target: str | Path,
    password_file: Path | None = None,
    *,
    fast_commit: bool = False,
    namespace: str = "ttci",
) -> Backend:
    """namespace: PostgreSQL's schema for this service's tables (services may share a database)."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(text, password_file, namespace)
    if "://" in text:
        raise BadInput(
            f"database {mask_url(text)!r} is neither a SQLite file nor a postgresql:// URL",
            hint="e.g. /var/lib/ttci/state/scheduler/scheduler.db or postgresql://tt@db/ttci",
        )
    from ttci.infra.sql_sqlite import SqliteBackend  # noqa: PLC0415 - it imports this module

    return SqliteBackend(Path(text), fast_commit)


@dataclass
class Result:
    """A statement's rows (read at once, inside its transaction) and its row count."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rowcount: int = -1

    def fetchone(self) -> Any:
        """The first row (a tuple), or None."""
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def dicts(self) -> list[dict[str, Any]]:
        cols = self.columns
        return [dict(zip(cols, r, strict=True)) for r in self.rows]


def result_of(cur: Any) -> Result:
    if cur.description is None:
        return Result(rowcount=cur.rowcount)
    return Result(list(cur.fetchall()), [d[0] for d in cur.description], cur.rowcount)


def migrate_all(db: Database, migrations: list[Migration]) -> None:
    """Apply what is missing, in one transaction the backend made exclusive."""
    table = db.table("_migrations")
    if not table.exists():
        table.create({"name": str, "applied_at": str}, pk="name")
    done = {r["name"] for r in table.rows}
    for name, fn in migrations:
        if name not in done:
            fn(db)
            table.insert({"name": name, "applied_at": now()})
            log.info("database migration %s applied", name)


class Mutexes:
    """Named in-process locks (SQLite's mutex; PostgreSQL's, before its advisory lock)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())


def _load_psycopg() -> tuple[Any, Any]:
    try:
        import psycopg  # noqa: PLC0415 - only a postgresql:// database needs it
        import psycopg_pool  # noqa: PLC0415
    except ImportError as e:
        raise BadInput(
            "a postgresql:// database needs psycopg 3 and psycopg-pool",
            hint="pip install 'ttci[scheduler]' (or 'ttci[github]')",
        ) from e
    return psycopg, psycopg_pool


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, url: str, password_file: Path | None, namespace: str) -> None:
        psycopg, psycopg_pool = _load_psycopg()
        self._pg, self._pool_mod = psycopg, psycopg_pool
        self.shown = mask_url(url)
        self.namespace = namespace
        kwargs: dict[str, Any] = {
            "autocommit": True,  # a lone statement is one round trip; begin() opens a transaction
            "application_name": f"tt-{namespace}",
            "options": f"-c search_path={namespace}",
        }
        if password_file is not None:
            kwargs["password"] = password_file.read_text().strip()
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=POOL_MIN,  # opened at start: a burst does not wait for new connections
            max_size=POOL_MAX,
            kwargs=kwargs,
            configure=_configure,
            timeout=30,
            open=False,
            name="ttci",
        )
        try:
            self.pool.open(wait=True, timeout=15)
        except psycopg_pool.PoolTimeout as e:
            self.pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to the database {self.shown} within 15 s",
                hint="is PostgreSQL up and the URL (user, host, port, database) right? "
                "The server's log says why it refused",
            ) from e
        self._url, self._kwargs = url, kwargs
        self._closed = threading.Event()
        self._sql: dict[str, str] = {}
        self._mutexes = Mutexes()
        self._pks: dict[str, tuple[str, ...]] = {}

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        pg = self._pg
        try:
            yield
        except pg.errors.IntegrityError as e:
            raise IntegrityError(f"the database refused the write: {e}") from e
        except (
            pg.OperationalError,
            pg.errors.ReadOnlySqlTransaction,
            pg.errors.SerializationFailure,
            pg.errors.AdminShutdown,
        ) as e:
            raise DatabaseUnavailable(
                f"the database {self.shown} is unavailable: {str(e).strip()[:300]}",
                hint="retry in a moment (nothing of this request was kept)",
            ) from e

    def begin(self, exclusive: bool = False) -> Conn:
        conn = self._getconn()
        conn.autocommit = False  # psycopg sends BEGIN before the first statement
        if exclusive:
            try:
                with self._errors():
                    conn.execute("select pg_advisory_xact_lock(%s)", [lock_key("migrate")])
            except BaseException:
                self._putconn(conn)
                raise
        return conn

    def begin_read(self) -> Conn:
        """A READ ONLY, REPEATABLE READ transaction: all its statements see one snapshot
        (PostgreSQL's readers never wait for its writers)."""
        conn = self._getconn()
        try:
            conn.autocommit = False
            conn.isolation_level = self._pg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        except BaseException:
            self._putconn(conn)
            raise
        return conn

    def _putconn(self, conn: Conn) -> None:
        with contextlib.suppress(Exception):  # a broken connection: the pool drops it
            conn.rollback()
            conn.autocommit = True
            conn.isolation_level = conn.read_only = None
        self.pool.putconn(conn)

    def _getconn(self) -> Conn:
        try:
            return self.pool.getconn()
        except self._pool_mod.PoolClosed as e:  # the service is stopping
            raise DatabaseUnavailable(f"the database {self.shown} is closed") from e
        except self._pool_mod.PoolTimeout as e:
            raise DatabaseUnavailable(
                f"no connection to the database {self.shown} within 30 s",
                hint="retry in a moment; the database may be failing over or overloaded",
            ) from e

    def end(self, conn: Conn, commit: bool) -> None:
        try:
            with self._errors():
                conn.commit() if commit else conn.rollback()
        finally:
            self._putconn(conn)

    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return out

    def run(self, conn: Conn, sql: str, params: Sequence[Any]) -> Result:
        with self._errors():
            return result_of(conn.execute(self._translate(sql), params or None))

    def run_alone(self, sql: str, params: Sequence[Any]) -> Result:
        conn = self._getconn()  # autocommit: the statement is its own transaction
        try:
            return self.run(conn, sql, params)
        finally:
            self.pool.putconn(conn)

    def run_many(self, conn: Conn, sql: str, rows: list[Sequence[Any]]) -> None:
        with self._errors(), conn.cursor() as cur:
            cur.executemany(self._translate(sql), rows)

    def table_names(self, db: Database) -> list[str]:
        rows = db.execute(
            "select table_name from information_schema.tables where table_schema = current_schema()"
        ).fetchall()
        return [r[0] for r in rows]

    def columns_of(self, db: Database, table: str) -> list[str]:
        rows = db.execute(
            "select column_name from information_schema.columns where table_name = ? "
            "and table_schema = current_schema() order by ordinal_position",
            [table],
        ).fetchall()
        return [r[0] for r in rows]

    def primary_key(self, db: Database, table: str) -> tuple[str, ...]:
        if table not in self._pks:
            rows = db.execute(
                "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid "
                "and a.attnum = any(i.indkey) where i.indrelid = cast(? as regclass) "
                "and i.indisprimary order by array_position(i.indkey, a.attnum)",
                [table],
            ).fetchall()
            self._pks[table] = tuple(r[0] for r in rows)
        return self._pks[table]

    @contextlib.contextmanager
    def mutex(self, name: str) -> Iterator[None]:
        with self._mutexes.get(name):  # one waiter per process holds a connection
            conn = self._getconn()  # autocommit: the lock is the session's, no transaction
            key = lock_key(name)
            try:
                with self._errors():
                    conn.execute("select pg_advisory_lock(%s)", [key])
                yield
            finally:
                try:
                    with self._errors():
                        conn.execute("select pg_advisory_unlock(%s)", [key])
                finally:
                    self.pool.putconn(conn)

    def listen(self, channel: str, fn: Callable[[str], None]) -> None:
        """LISTEN on a connection of its own (reconnecting after a failover) until close."""

        def loop() -> None:
            while not self._closed.is_set():
                try:
                    with self._pg.connect(self._url, **self._kwargs) as conn:
                        conn.execute(f'LISTEN "{channel}"')
                        while not self._closed.is_set():
                            for n in conn.notifies(timeout=1.0):
                                fn(n.payload)
                except self._pg.Error as e:
                    log.warning("listening on %s: %s; again in 1 s", self.shown, e)
                    self._closed.wait(1.0)
                except Exception:  # the listener must survive what fn raises
                    log.exception("a %s notification failed", channel)

        threading.Thread(target=loop, name=f"listen-{channel}", daemon=True).start()

    def migrate(self, db: Database, migrations: list[Migration]) -> None:
        with db.transaction(exclusive=True):  # pg_advisory_xact_lock: one replica migrates
            db.execute(f'create schema if not exists "{self.namespace}"')
            migrate_all(db, migrations)

    def close(self) -> None:
        self._closed.set()
        self.pool.close()


def _configure(conn: Any) -> None:
    """Sums of BIGINT columns come back as numbers the code (and JSON) takes: int or float."""
    from psycopg.types.numeric import NumericLoader  # noqa: PLC0415 - see _load_psycopg

    class Numeric(NumericLoader):
        def load(self, data: Any) -> Any:
            d = super().load(data)
            return int(d) if d.is_finite() and d == d.to_integral_value() else float(d)

    conn.adapters.register_loader("numeric", Numeric)
    conn.commit()
