"""The admission queue's rows and the admins' quotas in the scheduler's database.

The queue table holds one row per waiting ENV (its ENV row says "queued"), so a restarted
scheduler keeps every request and its order (enqueue times are epoch seconds). Quotas are rows
per scope (user, project, kind). What runs now is counted from the VM rows.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ttci.infra.sql import SqlStore
from ttci.model.errors import BadInput
from ttci.scheduler.planning.admission import InUse, QueuedRequest, Quota, Quotas, Waiting

__all__ = [
    "SCOPES",
    "deadlines",
    "dequeue",
    "enqueue",
    "in_use",
    "load_queue",
    "load_quotas",
    "parse_quota",
    "remove_quota",
    "set_quota",
    "share_decision",
    "shared_decision",
]

SCOPES = ("user", "project", "kind")
NO_DEADLINE = math.inf


def enqueue(store: SqlStore, req: QueuedRequest, deadline: float | None) -> None:
    """Record a waiting request. The caller holds the store's lock."""
    store.db.table("queue").insert(
        {
            "env": req.id,
            "request": json.dumps(req.to_dict()),
            "enqueued_at": req.enqueued_at,
            "deadline": NO_DEADLINE if deadline is None else deadline,
        }
    )


def dequeue(store: SqlStore, env: str) -> bool:
    """Forget a waiting request; True if it was there. The caller holds the store's lock."""
    n = store.db.execute("delete from queue where env = ?", [env]).rowcount
    return bool(n)


def load_queue(store: SqlStore) -> list[QueuedRequest]:
    with store.lock:
        rows = list(store.db.table("queue").rows_where(order_by="enqueued_at, env"))
    return [QueuedRequest.from_dict(json.loads(r["request"])) for r in rows]


def deadlines(store: SqlStore) -> dict[str, float]:
    """The waiting requests that have a max_wait: ENV name -> epoch deadline (one query)."""
    with store.lock:
        rows = store.db.execute(
            "select env, deadline from queue where deadline < ?", [NO_DEADLINE]
        ).fetchall()
    return {env: float(deadline) for env, deadline in rows}


def in_use(store: SqlStore) -> InUse:
    """VMs that hold capacity now (being created included), per owner and project."""
    with store.lock:
        rows = store.db.execute(
            "select e.owner, e.project, v.cpus from vms v join envs e on e.name = v.env "
            "where v.state in ('creating', 'running', 'lost')"
        ).fetchall()
    return InUse.tally((o, p or f"user:{o}", float(c)) for o, p, c in rows)


def load_quotas(store: SqlStore) -> Quotas:
    users: dict[str, Quota] = {}
    projects: dict[str, Quota] = {}
    kinds: dict[str, int] = {}
    with store.lock:
        rows = list(store.db.table("quotas").rows)
    for r in rows:
        q = Quota(r["vms"], r["cpus"], r["priority"])
        if r["scope"] == "user":
            users[r["name"]] = q
        elif r["scope"] == "project":
            projects[r["name"]] = q
        elif r["priority"] is not None:
            kinds[r["name"]] = int(r["priority"])
    return Quotas(users=users, projects=projects, kinds=kinds)


def _opt_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadInput(f"quota {key} {v!r} is not a whole number in {lo}..{hi}", hint="or null")
    return v


def parse_quota(body: Any) -> tuple[str, str, Quota]:
    """`{"scope": "user"|"project"|"kind", "name": ..., "vms", "cpus", "priority"}`."""
    if not isinstance(body, dict):
        raise BadInput("the quota must be a JSON object", hint='e.g. {"scope": "user", ...}')
    scope, name = body.get("scope"), body.get("name")
    if scope not in SCOPES:
        raise BadInput(f"quota scope {scope!r} is unknown", hint=f"one of {', '.join(SCOPES)}")
    if not isinstance(name, str) or not 0 < len(name) <= 200 or not name.isprintable():
        raise BadInput("quota name must be 1-200 printable characters", hint="e.g. alice")
    cpus = body.get("cpus")
    if cpus is not None and (
        isinstance(cpus, bool)
        or not isinstance(cpus, int | float)
        or not math.isfinite(cpus)
        or not 0 <= cpus <= 100_000
    ):
        raise BadInput(f"quota cpus {cpus!r} is not a number in 0..100000", hint="or null")
    quota = Quota(
        _opt_int(body, "vms", 0, 1_000_000),
        None if cpus is None else float(cpus),
        _opt_int(body, "priority", -1000, 1000),
    )
    if scope == "kind" and (quota.vms is not None or quota.cpus is not None):
        raise BadInput("an origin kind takes only a priority", hint="set caps per user/project")
    return scope, name, quota


def set_quota(store: SqlStore, scope: str, name: str, quota: Quota) -> None:
    with store.lock:
        store.db.table("quotas").upsert(
            {"scope": scope, "name": name, **quota.to_dict()}, pk=("scope", "name")
        )


def remove_quota(store: SqlStore, scope: str, name: str) -> bool:
    with store.lock:
        n = store.db.execute(
            "delete from quotas where scope = ? and name = ?", [scope, name]
        ).rowcount
    return bool(n)


def share_decision(store: SqlStore, at: float, waiting: list[Waiting]) -> None:
    """The dispatcher's last decision (positions, what blocks each request), for the other
    replicas' queue views and progress streams."""
    value = json.dumps({"at": at, "waiting": [w.to_dict() for w in waiting]})
    store.db.execute(
        "insert into meta (name, value) values ('queue_decision', ?) "
        "on conflict (name) do update set value = excluded.value",
        [value],
    )


def shared_decision(store: SqlStore) -> tuple[float, list[Waiting]] | None:
    """(when, the waiting requests) of the last decision any replica shared, or None."""
    row = store.db.execute("select value from meta where name = 'queue_decision'").fetchone()
    if row is None:
        return None
    d = json.loads(row[0])
    return float(d["at"]), [Waiting.from_dict(w) for w in d["waiting"]]
