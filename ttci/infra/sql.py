"""The services' database: one portable layer over SQLite (the default) or PostgreSQL.

The scheduler and the GitHub service keep their state through this layer: a small subset of
sqlite-utils' API (`db.table(name).insert/upsert/update/get/rows_where/count_where/delete_where`,
`db.execute`/`db.query` with `?` placeholders), one schema written once with Python types
(str -> TEXT, int -> BIGINT, float -> DOUBLE PRECISION; JSON kept as TEXT) and one list of named
migrations recorded in `_migrations`, applied to either backend. SQL given to it is the portable
subset both speak (ON CONFLICT, never INSERT OR REPLACE, rowid or json_extract).

Transactions: `with store.lock:` is one transaction on the calling thread's connection (nested
uses join it; it commits at the outermost exit, rolls back on an exception). SQLite has one
connection shared under a lock, as before; PostgreSQL a pool (ttci/infra/sql_backends.py). A
statement outside any `with store.lock:` is a transaction of its own.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ttci.infra.db import now
from ttci.infra.sql_backends import (
    Backend,
    Conn,
    DatabaseUnavailable,
    IntegrityError,
    Result,
    mask_url,
    open_backend,
)

__all__ = [
    "ANALYZE_AFTER",
    "Database",
    "DatabaseUnavailable",
    "IntegrityError",
    "Migration",
    "NotFoundError",
    "Result",
    "SqlStore",
    "Table",
    "mask_url",
]

Migration = tuple[str, Callable[["Database"], None]]
ANALYZE_AFTER = 1000  # rows inserted at once after which PostgreSQL's statistics are refreshed
_TYPES = {
    "sqlite": {str: "TEXT", int: "INTEGER", float: "FLOAT"},  # as sqlite-utils made them
    "postgresql": {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION"},
}


class NotFoundError(LookupError):
    """No row with that primary key."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Tx(threading.local):
    conn: Conn | None = None
    depth: int = 0


class Database:
    """Statements on the current transaction's connection (see the module's docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.dialect = backend.dialect
        self._tx = _Tx()

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[Conn]:
        tx = self._tx
        if tx.depth:
            tx.depth += 1
            try:
                yield tx.conn
            finally:
                tx.depth -= 1
            return
        conn = self.backend.begin(exclusive)
        tx.conn, tx.depth = conn, 1
        ok = False
        try:
            yield conn
            ok = True
        finally:
            tx.conn, tx.depth = None, 0
            self.backend.end(conn, commit=ok)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads in one read-only transaction, without the writers' lock (SQLite: on
        this thread's reader). Inside a transaction: that transaction."""
        tx = self._tx
        if tx.depth:
            with self.transaction():
                yield
            return
        conn = self.backend.begin_read()
        tx.conn, tx.depth = conn, 1
        try:
            yield
        finally:
            tx.conn, tx.depth = None, 0
            self.backend.end(conn, commit=False)

    def in_transaction(self) -> bool:
        return bool(self._tx.depth)

    # -- statements --------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        tx = self._tx
        if tx.depth:
            return self.backend.run(tx.conn, sql, params)
        return self.backend.run_alone(sql, params)  # one statement: atomic by itself

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.transaction() as conn:
            self.backend.run_many(conn, sql, list(rows))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.execute(sql, params).dicts()

    def table(self, name: str) -> Table:
        return Table(self, name)

    def table_names(self) -> list[str]:
        return self.backend.table_names(self)

    def columns_of(self, table: str) -> list[str]:
        return self.backend.columns_of(self, table)

    def type_of(self, py: type) -> str:
        return _TYPES[self.dialect][py]


class Table:
    """One table, sqlite-utils' way: rows as dicts, a primary key per table (given or looked up)."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name

    # -- schema ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.name in self.db.table_names()

    def create(
        self,
        columns: dict[str, type],
        pk: str | tuple[str, ...],
        not_null: Iterable[str] = (),
        defaults: dict[str, Any] | None = None,
    ) -> None:
        keys = (pk,) if isinstance(pk, str) else pk
        nn, defaults = set(not_null), defaults or {}
        cols = []
        for col, py in columns.items():
            text = f"{_q(col)} {self.db.type_of(py)}"
            if len(keys) == 1 and col == keys[0]:
                auto = py is int and self.db.dialect == "postgresql"
                text += " GENERATED BY DEFAULT AS IDENTITY" if auto else ""
                text += " PRIMARY KEY"
            if col in nn:
                text += " NOT NULL"
            if col in defaults:
                text += f" DEFAULT {_literal(defaults[col])}"
            cols.append(text)
        if len(keys) > 1:
            cols.append(f"PRIMARY KEY ({', '.join(map(_q, keys))})")
        self.db.execute(f"CREATE TABLE {_q(self.name)} ({', '.join(cols)})")

    def add_column(self, name: str, py: type, not_null_default: Any = None) -> None:
        extra = (
            "" if not_null_default is None else f" NOT NULL DEFAULT {_literal(not_null_default)}"
        )
        self.db.execute(
            f"ALTER TABLE {_q(self.name)} ADD COLUMN {_q(name)} {self.db.type_of(py)}{extra}"
        )

    def create_index(self, columns: list[str], unique: bool = False) -> None:
        name = f"idx_{self.name}_{'_'.join(columns)}"
        self.db.execute(
            f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {_q(name)} "
            f"ON {_q(self.name)} ({', '.join(map(_q, columns))})"
        )

    @property
    def pks(self) -> tuple[str, ...]:
        return self.db.backend.primary_key(self.db, self.name)

    # -- rows --------------------------------------------------------------------------------
    def _pk_where(self, pk: Any) -> tuple[str, list[Any]]:
        keys = self.pks
        values = list(pk) if isinstance(pk, list | tuple) else [pk]
        if len(values) != len(keys):
            raise NotFoundError(f"{self.name}: key {pk!r} does not match {keys}")
        return " and ".join(f"{_q(k)} = ?" for k in keys), values

    def get(self, pk: Any) -> dict[str, Any]:
        where, args = self._pk_where(pk)
        rows = self.rows_where(where, args, limit=1)
        if not rows:
            raise NotFoundError(f"no row {pk!r} in {self.name}")
        return rows[0]

    def rows_where(  # noqa: PLR0917 - sqlite-utils' signature, kept for its call sites
        self,
        where: str | None = None,
        args: Sequence[Any] = (),
        order_by: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        select: str = "*",
    ) -> list[dict[str, Any]]:
        return self.db.query(self.rows_sql(where, order_by, limit, offset, select), list(args))

    def rows_sql(
        self,
        where: str | None,
        order_by: str | None,
        limit: int | None,
        offset: int | None,
        select: str = "*",
    ) -> str:
        sql = f"select {select} from {_q(self.name)}"  # noqa: S608 (names from our code)
        if where:
            sql += f" where {where}"
        if order_by:
            sql += f" order by {order_by}"
        if limit is not None:
            sql += f" limit {int(limit)}"
        if offset:
            sql += f" offset {int(offset)}"
        return sql

    def rows_packed(  # noqa: PLR0917 - rows_where's, and the columns to read
        self,
        columns: Sequence[str],
        where: str,
        args: Sequence[Any] = (),
        order_by: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[dict[str, Any]]:
        """rows_where for many rows of TEXT, INTEGER and rounded REAL columns, read in one step.

        SQLite's driver gives the GIL up around every row it steps, so under concurrent reads a
        page of 100 rows waits for it 100 times; here SQLite packs the page into one JSON array
        (REAL values keep 15 significant digits: for rounded numbers like seconds and CPUs, not
        timestamps). PostgreSQL's driver reads the whole result at once: plain rows_where."""
        select = ", ".join(map(_q, columns))
        if self.db.dialect != "sqlite" or self.db.in_transaction():
            return self.rows_where(where, args, order_by, limit, offset, select)
        pairs = ", ".join(f"'{c}', {_q(c)}" for c in columns)
        inner = self.rows_sql(where, order_by, limit, offset, select)
        row = self.db.execute(
            f"select json_group_array(json_object({pairs})) from ({inner})",  # noqa: S608
            list(args),
        ).fetchone()
        rows: list[dict[str, Any]] = json.loads(row[0]) if row and row[0] else []
        return rows

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.rows_where()

    def count_where(self, where: str | None = None, args: Sequence[Any] = ()) -> int:
        sql = f"select count(*) from {_q(self.name)}"  # noqa: S608
        row = self.db.execute(sql + (f" where {where}" if where else ""), list(args)).fetchone()
        return int(row[0]) if row else 0

    def insert(self, record: dict[str, Any]) -> None:
        self.insert_all([record])

    def insert_all(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        cols = list(records[0])
        sql = (
            f"insert into {_q(self.name)} ({', '.join(map(_q, cols))}) "  # noqa: S608
            f"values ({', '.join('?' * len(cols))})"
        )
        if len(records) == 1:
            self.db.execute(sql, [records[0][c] for c in cols])
            return
        self.db.executemany(sql, ([r[c] for c in cols] for r in records))
        if len(records) >= ANALYZE_AFTER and self.db.dialect == "postgresql":
            # Fresh statistics now, not at autovacuum's next round: without them PostgreSQL
            # sorts a 10,000-VM ENV for every page of it (10 ms instead of 0.3).
            self.db.execute(f"analyze {_q(self.name)}")

    def upsert(self, record: dict[str, Any], pk: str | tuple[str, ...]) -> None:
        """Insert the row, or update the given columns of the row with its key."""
        keys = (pk,) if isinstance(pk, str) else pk
        cols = list(record)
        sets = [f"{_q(c)} = excluded.{_q(c)}" for c in cols if c not in keys]
        action = f"do update set {', '.join(sets)}" if sets else "do nothing"
        self.db.execute(
            f"insert into {_q(self.name)} ({', '.join(map(_q, cols))}) "  # noqa: S608
            f"values ({', '.join('?' * len(cols))}) "
            f"on conflict ({', '.join(map(_q, keys))}) {action}",
            [record[c] for c in cols],
        )

    def update(self, pk: Any, fields: dict[str, Any]) -> None:
        """Set fields of the row with this key. Raises NotFoundError when there is none."""
        where, args = self._pk_where(pk)
        if not fields:
            return
        sets = ", ".join(f"{_q(c)} = ?" for c in fields)
        n = self.db.execute(
            f"update {_q(self.name)} set {sets} where {where}",  # noqa: S608
            [*fields.values(), *args],
        ).rowcount
        if n == 0:
            raise NotFoundError(f"no row {pk!r} in {self.name}")

    def delete(self, pk: Any) -> None:
        """Delete the row with this key (if it is there)."""
        where, args = self._pk_where(pk)
        self.delete_where(where, args)

    def delete_where(self, where: str, args: Sequence[Any] = ()) -> int:
        sql = f"delete from {_q(self.name)} where {where}"  # noqa: S608
        return self.db.execute(sql, list(args)).rowcount


def _literal(v: Any) -> str:
    if isinstance(v, bool | int | float):
        return repr(float(v)) if isinstance(v, float) else str(int(v))
    return "'" + str(v).replace("'", "''") + "'"


class SqlStore:
    """A service's database: `db` (statements and tables), `lock` (a transaction, see above).

    Args:
        target: a SQLite file path, or a `postgresql://` URL.
        migrations: named migrations, applied once in order (also when replicas start together).
        password_file: a file holding the PostgreSQL password (else the URL's, or PGPASSFILE).
        fast_commit: SQLite's synchronous=NORMAL (a power cut may lose the last commits).
        namespace: the PostgreSQL schema of this service's tables (so services can share a
            database): ttci_scheduler, ttci_github.
    """

    def __init__(
        self,
        target: str | Path,
        migrations: list[Migration],
        *,
        password_file: Path | None = None,
        fast_commit: bool = False,
        namespace: str = "ttci",
    ) -> None:
        self.backend = open_backend(
            target, password_file, fast_commit=fast_commit, namespace=namespace
        )
        self.url = self.backend.shown  # for logs: never a password
        self.db = Database(self.backend)
        self.lock = _Lock(self.db)
        self.backend.migrate(self.db, migrations)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def mutex(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive across every process on this database (PostgreSQL: an advisory lock held
        by a connection of its own; SQLite: one process, a lock in it). Take it before any
        `with store.lock:` of the same thread, never inside one."""
        return self.backend.mutex(name)

    def notify(self, channel: str, payload: str) -> None:
        """Tell every process listening on channel (PostgreSQL's NOTIFY, sent at the commit
        of the current transaction; SQLite has one process: nobody to tell)."""
        if self.dialect == "postgresql":
            self.db.execute("select pg_notify(?, ?)", [channel, payload])

    def listen(self, channel: str, fn: Callable[[str], None]) -> None:
        """Call fn(payload) for each notification on channel, in a thread of its own (until
        close); nothing on SQLite."""
        self.backend.listen(channel, fn)

    def applied(self) -> list[str]:
        return [r["name"] for r in self.db.table("_migrations").rows]

    def writable(self) -> str:
        """The database takes a write (a row in `_ready`), in a transaction."""
        with self.lock:
            self.db.execute("create table if not exists _ready (id integer primary key, at text)")
            self.db.execute(
                "insert into _ready (id, at) values (1, ?) on conflict (id) do update set at = ?",
                [now(), now()],
            )
        return f"writable ({self.dialect})"

    def close(self) -> None:
        self.backend.close()


class _Lock:
    """`with store.lock:`: one transaction (see the module's docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cms: threading.local = threading.local()

    def __enter__(self) -> None:
        cm = self._db.transaction()
        stack: list[Any] = self._cms.__dict__.setdefault("stack", [])
        cm.__enter__()
        stack.append(cm)

    def __exit__(self, *exc: Any) -> None:
        cm = self._cms.stack.pop()
        cm.__exit__(*exc)
