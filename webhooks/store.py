"""The webhook service's state (SQLite or PostgreSQL, ttci/infra/sql.py; named migrations):
jobs and deliveries."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from ttci.infra import sql_leases
from ttci.infra.sql import Database, Migration, SqlStore
from webhooks.core.jobs import ACTIVE, OPEN, Event, State, transition
from webhooks.core.queueing import redeliverable

__all__ = ["JOB_COLUMNS", "MIGRATIONS", "JobStore"]


def _base(db: Database) -> None:
    db.table("jobs").create(
        {
            "id": int,  # GitHub's workflow job id
            "repo": str,  # owner/name
            "owner": str,
            "installation_id": int,
            "run_id": int,
            "name": str,
            "html_url": str,
            "labels": str,  # JSON list, as GitHub sent them
            "os_prefix": str,
            "state": str,
            "reason": str,  # why unservable, or the last error
            "attempt": int,
            "runner_name": str,  # our JIT runner of the current attempt
            "runner_id": int,
            "env": str,  # the ENV of the current attempt
            "took_runner": str,  # the runner GitHub says took the job
            "gh_status": str,  # the last status GitHub told us
            "conclusion": str,
            "not_before": float,
            "state_since": float,
            "queued_at": float,
            "vm_ready_at": float,
            "runner_started_at": float,
            "guest_boot_s": float,
            "updated_at": float,
        },
        pk="id",
        defaults={"attempt": 0, "not_before": 0.0, "reason": "", "env": "", "runner_name": ""},
    )
    db.table("jobs").create_index(["state"])
    db.table("deliveries").create(
        {
            "id": str,
            "event": str,
            "action": str,
            "job_id": int,
            "received_at": float,
            "outcome": str,
        },
        pk="id",
    )
    db.table("deliveries").create_index(["received_at"])


def _launched_at(db: Database) -> None:
    db.table("jobs").add_column("launched_at", float)


JOB_COLUMNS = {
    "id",
    "repo",
    "owner",
    "installation_id",
    "run_id",
    "name",
    "html_url",
    "labels",
    "os_prefix",
    "state",
    "reason",
    "attempt",
    "runner_name",
    "runner_id",
    "env",
    "took_runner",
    "gh_status",
    "conclusion",
    "not_before",
    "state_since",
    "queued_at",
    "vm_ready_at",
    "runner_started_at",
    "guest_boot_s",
    "updated_at",
    "launched_at",
}
MIGRATIONS: list[Migration] = [
    ("0001_jobs_deliveries", _base),
    ("0002_launched_at", _launched_at),
    ("0003_leases", sql_leases.create_table),  # replicas: one runs the loops (service_base)
]


_STATE = "select state from jobs where id = ?"
_STATE_FOR_UPDATE = _STATE + " for update"


class JobStore:
    """Jobs and deliveries; every method is one transaction (`batch` groups several)."""

    def __init__(self, target: str | Path, password_file: Path | None = None) -> None:
        """target: a SQLite file or a postgresql:// URL (ttci/infra/sql.py)."""
        # SQLite in WAL + NORMAL: a commit does not wait for fsync (the webhook answers in
        # milliseconds); a power cut may lose the last deliveries, never corrupt the file, and
        # the reconciler finds any job GitHub still has queued.
        self.store = SqlStore(
            target,
            MIGRATIONS,
            password_file=password_file,
            fast_commit=True,
            namespace="ttci_github",
        )
        self.db = self.store.db

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        """One transaction; nested uses join the outer one."""
        return self.store.lock

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group several calls into one transaction (one commit per delivery)."""
        return self._tx()

    # -- deliveries ------------------------------------------------------------------------
    def first_delivery(self, delivery: str, event: str, action: str, job_id: int) -> float | None:
        """Record a delivery; None if it is new (or a redelivery of one refused as stale
        without GitHub's word: looked at afresh), else when it was first received (a replay)."""
        with self._tx():
            row = self.db.execute(
                "select received_at, outcome from deliveries where id = ?", [delivery]
            ).fetchone()
            if row and redeliverable(row[1]):
                self.db.execute(
                    "update deliveries set outcome = '', received_at = ? where id = ?",
                    [time.time(), delivery],
                )
                return None
            if row:
                return float(row[0])
            # Two replicas given the same delivery at once: one inserts, the other waits for
            # it and inserts nothing, then answers it as the replay it is.
            n = self.db.execute(
                "insert into deliveries (id, event, action, job_id, received_at, outcome)"
                " values (?, ?, ?, ?, ?, '') on conflict (id) do nothing",
                [delivery, event, action, job_id, time.time()],
            ).rowcount
            if n == 0:
                again = self.db.execute(
                    "select received_at from deliveries where id = ?", [delivery]
                ).fetchone()
                return float(again[0]) if again else time.time()
            return None

    def set_outcome(self, delivery: str, outcome: str) -> None:
        with self._tx():
            self.db.execute("update deliveries set outcome = ? where id = ?", [outcome, delivery])

    def prune_deliveries(self, older_than_s: float) -> int:
        with self._tx():
            cur = self.db.execute(
                "delete from deliveries where received_at < ?", [time.time() - older_than_s]
            )
            return cur.rowcount

    # -- jobs --------------------------------------------------------------------------------
    def get(self, job_id: int) -> dict[str, Any] | None:
        with self.store.lock:
            rows = list(self.db.table("jobs").rows_where("id = ?", [job_id]))
        return _decode(rows[0]) if rows else None

    def insert(self, row: dict[str, Any]) -> bool:
        """Insert a new job; False if it exists already."""
        now = time.time()
        full = {"state_since": now, "updated_at": now, "queued_at": now, **row}
        full["labels"] = json.dumps(full.get("labels", []))
        with self._tx():
            if self.db.execute("select 1 from jobs where id = ?", [row["id"]]).fetchone():
                return False
            return self._write(
                "insert into jobs ({cols}) values ({marks}) on conflict (id) do nothing", full
            )

    def update(self, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        with self._tx():
            self._write("update jobs set {sets} where id = ?", {**fields, "id": job_id})

    def apply(self, job_id: int, event: Event, **fields: Any) -> tuple[State | None, State | None]:
        """Apply a state-machine event; fields are written only when the state changes, except
        the ones GitHub reports (gh_status, took_runner, conclusion), which are always kept.
        Returns (old state, new state or None if nothing changed)."""
        # PostgreSQL: lock the row until the transaction ends, so two threads (or replicas)
        # applying events to one job cannot both read the old state and lose one update.
        sql = _STATE_FOR_UPDATE if self.db.dialect == "postgresql" else _STATE
        with self._tx():
            row = self.db.execute(sql, [job_id]).fetchone()
            old = State(row[0]) if row else None
            new = transition(old, event)
            keep = {
                k: v for k, v in fields.items() if k in ("gh_status", "took_runner", "conclusion")
            }
            now = time.time()
            if row is None:
                return None, None
            if new is None:
                if keep:
                    self._write(
                        "update jobs set {sets} where id = ?",
                        {**keep, "updated_at": now, "id": job_id},
                    )
                return old, None
            self._write(
                "update jobs set {sets} where id = ?",
                {**fields, "state": new.value, "state_since": now, "updated_at": now, "id": job_id},
            )
            return old, new

    def _write(self, template: str, values: dict[str, Any]) -> bool:
        """Run an insert/update (True: a row was written); column names come from our own
        code and are checked against the table's (never from a request)."""
        bad = set(values) - JOB_COLUMNS
        if bad:
            raise ValueError(f"unknown job columns {sorted(bad)}")
        cols = [k for k in values if k != "id" or template.startswith("insert")]
        args = [values[c] for c in cols]
        if "where id = ?" in template:
            args.append(values["id"])
        sql = template.format(
            cols=", ".join(cols),
            marks=", ".join("?" * len(cols)),
            sets=", ".join(f"{c} = ?" for c in cols),
        )
        return self.db.execute(sql, args).rowcount > 0

    def claim_pending(self, now: float, limit: int = 200) -> list[dict[str, Any]]:
        """Pending jobs whose back-off has passed, oldest first (at most limit)."""
        with self.store.lock:
            rows = self.db.table("jobs").rows_where(
                "state = ? and not_before <= ?",
                [State.PENDING.value, now],
                order_by="queued_at",
                limit=limit,
            )
            return [_decode(r) for r in rows]

    def active_counts(self) -> tuple[int, dict[str, int]]:
        """(VMs in use overall, per owner): jobs with an ENV not yet deleted."""
        states = [s.value for s in ACTIVE] + [State.COMPLETED.value]
        marks = ",".join("?" * len(states))
        with self.store.lock:
            rows = self.db.execute(
                f"select owner, count(*) from jobs where state in ({marks}) and env != ''"  # noqa: S608
                " group by owner",
                states,
            ).fetchall()
        per = {str(o): int(n) for o, n in rows}
        return sum(per.values()), per

    def open_jobs(self, include_done_since: float = 0.0) -> list[dict[str, Any]]:
        states = [s.value for s in OPEN]
        marks = ",".join("?" * len(states))
        with self.store.lock:
            rows = self.db.table("jobs").rows_where(
                f"state in ({marks}) or (state = 'done' and updated_at >= ? and "
                "coalesce(gh_status, '') != 'completed')",
                [*states, include_done_since],
            )
            return [_decode(r) for r in rows]

    def recent(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        with self.store.lock:
            where, args = ("state = ?", [state]) if state else (None, [])
            rows = self.db.table("jobs").rows_where(
                where, args, order_by="updated_at desc", limit=limit
            )
            return [_decode(r) for r in rows]

    def repos(self) -> list[tuple[str, int | None]]:
        """Every repository we have seen, with its App installation id (if any)."""
        with self.store.lock:
            rows = self.db.execute(
                "select repo, max(installation_id) from jobs group by repo"
            ).fetchall()
        return [(str(r), int(i) if i else None) for r, i in rows]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["labels"] = json.loads(row.get("labels") or "[]")
    return out
