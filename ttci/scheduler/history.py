"""Job history: one row per ENV (origin, created/ready/deleted times, VMs, result).

The scheduler's `envs` table forgets an ENV when it is deleted; this table keeps it, so the admin
page can show recent jobs with their durations and results, the metrics can count outcomes per
CI system, and the plots can show pool use over time. CI plugins and `tt job run` report a job's
outcome with `POST /v1/envs/<name>/result`.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ttci.infra.db import now
from ttci.infra.sql import Database, SqlStore
from ttci.model.errors import TTError
from ttci.wire.jobs import RESULTS, JobResult

__all__ = [
    "MIGRATION_NAME",
    "RESULTS",
    "JobNotFound",
    "env_deleted",
    "env_ready",
    "job_json",
    "migrate",
    "recent",
    "report_result",
    "since",
]

MIGRATION_NAME = "0010_job_history"


class JobNotFound(TTError):
    """No job (ENV, current or past) of that name is visible to this user."""


def migrate(db: Database) -> None:
    db.table("jobs").create(
        {
            "id": int,
            "env": str,
            "owner": str,
            "kind": str,
            "origin": str,
            "os_prefix": str,
            "created_at": str,
            "ready_at": str,
            "deleted_at": str,
            "ready_s": float,
            "vm_count": int,
            "cpus": float,
            "memory_mib": int,
            "images": str,
            "result": str,
            "reported_at": str,
        },
        pk="id",
        not_null={"env", "created_at"},
        defaults={"deleted_at": "", "result": "", "reported_at": ""},
    )
    db.table("jobs").create_index(["env"])
    db.table("jobs").create_index(["created_at"])


def _seconds_between(a: str, b: str) -> float:
    return (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()


def env_ready(store: SqlStore, name: str) -> None:
    """Record an ENV that has just become ready (the scheduler's create_env success path)."""
    with store.lock:
        env = store.db.table("envs").get(name)
        vms = store.db.query(
            "select count(*) as n, sum(cpus) as c, sum(memory_mib) as m from vms where env = ?",
            [name],
        )[0]
        images = ",".join(
            r[0]
            for r in store.db.execute(
                "select distinct image from vms where env = ? order by image", [name]
            ).fetchall()
        )
        origin = json.loads(env["origin"] or '{"kind": "cli"}')
        ready = now()
        store.db.table("jobs").insert(
            {
                "env": name,
                "owner": env["owner"],
                "kind": origin.get("kind", "cli"),
                "origin": json.dumps(origin),
                "os_prefix": env["os_prefix"],
                "created_at": env["created_at"],
                "ready_at": ready,
                "deleted_at": "",
                "ready_s": max(0.0, _seconds_between(env["created_at"], ready)),
                "wait_s": float(env.get("wait_s") or 0.0),
                "vm_count": vms["n"] or 0,
                "cpus": vms["c"] or 0.0,
                "memory_mib": vms["m"] or 0,
                "images": images,
                "result": "",
                "reported_at": "",
            }
        )


def env_deleted(store: SqlStore, name: str) -> None:
    """Close the ENV's open history row (the scheduler's delete_env, also the reaper's)."""
    with store.lock:
        store.db.execute(
            "update jobs set deleted_at = ? where env = ? and deleted_at = ''", [now(), name]
        )


def _latest(store: SqlStore, name: str) -> dict[str, Any] | None:
    rows = list(store.db.table("jobs").rows_where("env = ?", [name], order_by="id desc", limit=1))
    return rows[0] if rows else None


def report_result(
    store: SqlStore, name: str, user: str, admin: bool, result: JobResult
) -> dict[str, Any]:
    """Set the outcome of the newest job of ENV `name` (its owner or an admin may)."""
    with store.lock:
        row = _latest(store, name)
        if row is None or (row["owner"] != user and not admin):
            raise JobNotFound(
                f"no job for an ENV named {name!r}",
                hint="report the result before the ENV is created again; see `tt env list`",
            )
        store.db.table("jobs").update(row["id"], {"result": result.result, "reported_at": now()})
        return job_json(dict(store.db.table("jobs").get(row["id"])))


def job_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("origin", "images")}
    out["origin"] = json.loads(row.get("origin") or '{"kind": "cli"}')
    out["images"] = [i for i in (row.get("images") or "").split(",") if i]
    return out


def recent(store: SqlStore, limit: int = 50, owner: str | None = None) -> list[dict[str, Any]]:
    """The newest jobs first."""
    where, args = ("owner = ?", [owner]) if owner is not None else (None, [])
    with store.lock:
        rows = list(store.db.table("jobs").rows_where(where, args, order_by="id desc", limit=limit))
    return [job_json(r) for r in rows]


def since(store: SqlStore, start: str) -> list[dict[str, Any]]:
    """Jobs alive at or after `start` (for pool-use and latency plots): raw rows, oldest first."""
    with store.lock:
        return list(
            store.db.query(
                "select created_at, ready_at, deleted_at, ready_s, vm_count, cpus, memory_mib,"
                " kind from jobs where deleted_at = '' or deleted_at >= ? order by id",
                [start],
            )
        )
