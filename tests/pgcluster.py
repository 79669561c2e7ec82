"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries (make test-deps installs
the `postgresql` package; nothing of it needs to run), initdb in a temporary directory as the
`postgres` OS user (root may not run initdb), its own port on 127.0.0.1 and its socket in that
directory; a fresh database per test; stopped and removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import requests

__all__ = ["PG_BIN", "PgCluster", "leases_held", "pg_cluster"]

PG_BIN = Path(os.environ.get("TT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One running cluster (see the module's docstring); `url(db)` names one of its databases."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data, self.sock, self.log = root / "data", root / "sock", root / "server.log"

    def _as_postgres(self, *argv: str, timeout: float = 120) -> str:
        """Run a server binary as the postgres user (what initdb and the server insist on)."""
        pw = pwd.getpwnam("postgres")

        def drop() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

        preexec = drop if os.geteuid() == 0 else None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.root)}
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec, env=env
        )
        if r.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr[-2000:]}\n{log}")
        return r.stdout

    def start(self) -> None:
        self.sock.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.root, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._as_postgres(
                    str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                )

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def sql(self, statement: str, db: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True) as conn:
            conn.execute(statement.encode())

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database (from template0) for one test; dropped afterwards."""
        name = f"t{os.getpid()}_{next(_names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        try:
            yield self.url(name)
        finally:
            self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A started cluster, stopped and removed when the block ends (however it ends)."""
    root = Path(tempfile.mkdtemp(prefix="ttci-pg-"))
    cluster = PgCluster(root, _free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def leases_held(url: str) -> set[str]:
    """The leases a scheduler replica says (in its /metrics) it holds; none if it is silent."""
    try:
        text = requests.get(url + "/metrics", timeout=2).text
    except requests.RequestException:
        return set()
    return set(re.findall(r'ttci_lease_held\{name="(\w+)"\} 1\.0', text))
