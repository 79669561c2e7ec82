"""The database layer's read path, on SQLite and on a throw-away PostgreSQL (tests/pgcluster.py).

- A lone read is answered while another thread holds a write transaction open, and sees only
  what is committed (SQLite: a read-only connection per thread beside the writer's).
- rows_packed (one step for a whole page on SQLite) gives exactly what rows_where gives: the
  same rows in the same order with the same values and types, quotes, NULLs and non-ASCII text
  included, and nothing for an empty page.
- After the store is closed, a read is a clear DatabaseUnavailable, never a driver error; and
  closing it while other threads are in the middle of reads ends those reads the same way (on
  SQLite, closing a reader another thread was stepping crashed the whole process: a scheduler's
  background thread reading while the service stopped).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttci.infra.sql import Database, DatabaseUnavailable, Migration, SqlStore


def _schema(db: Database) -> None:
    db.table("vms").create(
        {"name": str, "env": str, "cpus": float, "memory_mib": int, "error": str, "net": str},
        pk="name",
    )
    db.table("vms").create_index(["env", "name"])


MIGRATIONS: list[Migration] = [("0001_vms", _schema)]


@pytest.fixture
def store(tmp_path: Path, database: str) -> Iterator[SqlStore]:
    s = SqlStore(database or tmp_path / "state" / "t.db", MIGRATIONS, namespace="ttci_test")
    yield s
    s.close()


def test_a_read_is_answered_while_a_write_transaction_is_open(store: SqlStore) -> None:
    db = store.db
    db.table("vms").insert({"name": "a", "env": "e", "cpus": 1.0, "memory_mib": 512})
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        with store.lock:
            db.table("vms").insert({"name": "b", "env": "e", "cpus": 1.0, "memory_mib": 512})
            inside.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(10)
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(db.table("vms").count_where()))
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "a lone read waited for the open write transaction"
        assert seen == [1]  # the uncommitted row is not visible
    finally:
        release.set()
        t.join(10)
    assert done.is_set()
    assert db.table("vms").count_where("env = ?", ["e"]) == 2  # committed: seen by every reader


def test_rows_packed_gives_what_rows_where_gives(store: SqlStore) -> None:
    table = store.db.table("vms")
    rows = [
        {
            "name": f"vm-{i:03d}",
            "env": "big" if i % 3 else "other",
            "cpus": [0.5, 1.0, 2.0, 1.25][i % 4],
            "memory_mib": 256 * (1 + i % 5),
            "error": None if i % 2 else f'it\'s "broken" ✗ {i}\n\ttab',
            "net": json.dumps({"ip": f"10.0.0.{i}/24", "ports": [[22, 2200]]}),
        }
        for i in range(250)
    ]
    with store.lock:
        table.insert_all(rows)
    cols = ("name", "cpus", "memory_mib", "error", "net")
    for offset, limit in ((0, 100), (100, 100), (160, 100), (0, 1000), (5, 1)):
        plain = table.rows_where(
            "env = ?", ["big"], order_by="name", limit=limit, offset=offset, select=", ".join(cols)
        )
        packed = table.rows_packed(cols, "env = ?", ["big"], "name", limit, offset)
        assert packed == plain
        assert [type(v) for r in packed for v in r.values()] == [
            type(v) for r in plain for v in r.values()
        ]
    assert table.rows_packed(cols, "env = ?", ["none"], "name", 100, 0) == []
    assert len(table.rows_packed(cols, "env = ?", ["big"], "name", 1000, 0)) == 166


def test_a_read_after_close_is_database_unavailable(tmp_path: Path, database: str) -> None:
    s = SqlStore(database or tmp_path / "state" / "t.db", MIGRATIONS, namespace="ttci_test")
    s.db.table("vms").count_where()  # this thread's reader exists
    s.close()
    with pytest.raises(DatabaseUnavailable):
        s.db.table("vms").count_where()
    with pytest.raises(DatabaseUnavailable):
        s.db.table("vms").rows_packed(("name",), "env = ?", ["e"])


def test_a_snapshot_sees_one_state_and_blocks_no_writer(store: SqlStore) -> None:
    db = store.db
    db.table("vms").insert({"name": "a", "env": "e", "cpus": 1.0, "memory_mib": 512})
    with db.snapshot():
        before = db.table("vms").count_where()
        writer = threading.Thread(
            target=lambda: db.table("vms").insert(
                {"name": "b", "env": "e", "cpus": 1.0, "memory_mib": 512}
            )
        )
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "a writer waited for a reader's snapshot"
        assert db.table("vms").count_where() == before == 1  # the write came after it began
    assert db.table("vms").count_where() == 2


_CLOSE_WHILE_READING = """
import sys, threading, time
from pathlib import Path
from ttci.infra.sql import DatabaseUnavailable, SqlStore
sys.path.insert(0, "tests")
from test_sql_reads import MIGRATIONS

target, rounds = sys.argv[1], int(sys.argv[2])
for n in range(rounds):
    store = SqlStore(target if "://" in target else Path(target) / f"{n}.db", MIGRATIONS,
                     namespace="ttci_close_test")
    vms = store.db.table("vms")
    if not vms.count_where():
        vms.insert_all([{"name": f"v{i}", "env": "e", "cpus": 1.0, "memory_mib": 512,
                         "error": "x" * 200} for i in range(300)])
    odd = []
    def read():
        while True:
            try:
                store.db.execute("select * from vms").fetchall()
            except DatabaseUnavailable:
                return
            except Exception as e:
                odd.append(repr(e))
                return
    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    time.sleep(0.02)
    store.close()
    for t in readers:
        t.join(30)
    assert not any(t.is_alive() for t in readers), "a reader still runs after close"
    assert not odd, odd
print("closed", rounds, "times")
"""


def test_closing_while_threads_read_ends_their_reads_cleanly(tmp_path: Path, database: str) -> None:
    rounds = 60
    script = [sys.executable, "-X", "faulthandler", "-c", _CLOSE_WHILE_READING]
    done = subprocess.run(
        [*script, database or str(tmp_path), str(rounds)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert done.stdout.strip() == f"closed {rounds} times"
