"""What the admin page shows, read in a few queries (it must stay fast with 1,000s of VMs).

Hosts come from the scheduler's host records (kept fresh by polling and heartbeats, never fetched
here); ENVs and VMs from two queries on the state database; jobs and plots from the job history.
Nothing secret is in here: host records are copied without any `token` key.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from ttci.infra.db import now
from ttci.infra.sql import SqlStore
from ttci.scheduler import admission_store as qs
from ttci.scheduler import history
from ttci.scheduler.admin import plots
from ttci.scheduler.cache_metrics import cache_rows
from ttci.scheduler.planning.admission import Quota, Usage

__all__ = [
    "ENV_COLS",
    "MAX_VMS_SHOWN",
    "PLOT_WINDOW_S",
    "VM_COLS",
    "envs_and_vms",
    "queue_rows",
    "quota_rows",
    "snapshot",
]

MAX_VMS_SHOWN = 5000
PLOT_WINDOW_S = 3600
ENV_COLS = "name, owner, os_prefix, state, created_at, expires_at, error, origin"
VM_COLS = "env, name, host, image, arch, state, cpus, memory_mib, accel, boot_s, error"


def _clean_host(h: dict[str, Any]) -> dict[str, Any]:
    """A host for the page: its capacity, use and health; no token, no image or template list."""
    hidden = ("images", "warm", "caches")
    out = {k: v for k, v in h.items() if "token" not in k.lower() and k not in hidden}
    out["image_count"] = len(h.get("images", []))
    templates = (h.get("warm") or {}).get("templates", [])
    out["templates"] = sum(1 for t in templates if t.get("state") == "ready")
    return out


def _matches(env: dict[str, Any], q: str) -> bool:
    origin = env["origin"]
    hay = " ".join(
        [env["name"], env["owner"], env["os_prefix"], env["state"], *map(str, origin.values())]
    )
    return q in hay.lower()


def envs_and_vms(store: SqlStore, q: str = "") -> dict[str, Any]:
    """ENVs (newest first) with their VMs; at most MAX_VMS_SHOWN VMs are listed."""
    with store.lock:
        envs = [
            dict(zip(ENV_COLS.split(", "), r, strict=True))
            for r in store.db.execute(
                f"select {ENV_COLS} from envs order by created_at desc, name"  # noqa: S608
            ).fetchall()
        ]
        vm_rows = store.db.execute(
            f"select {VM_COLS} from vms order by env, name"  # noqa: S608
        ).fetchall()
    by_env: dict[str, list[dict[str, Any]]] = {}
    by_state: dict[str, int] = {}
    by_host: dict[str, int] = {}
    keys = VM_COLS.split(", ")
    for r in vm_rows:
        vm = dict(zip(keys, r, strict=True))
        by_env.setdefault(vm.pop("env"), []).append(vm)
        by_state[vm["state"]] = by_state.get(vm["state"], 0) + 1
        by_host[vm["host"]] = by_host.get(vm["host"], 0) + 1
    q = q.strip().lower()
    shown, out, vm_total = 0, [], len(vm_rows)
    for e in envs:
        e["origin"] = json.loads(e["origin"] or '{"kind": "cli"}')
        if q and not _matches(e, q):
            continue
        vms = by_env.get(e["name"], [])
        e["vm_count"] = len(vms)
        e["vms"] = vms[: max(0, MAX_VMS_SHOWN - shown)]
        shown += len(e["vms"])
        out.append(e)
    return {
        "envs": out,
        "vm_total": vm_total,
        "vm_shown": shown,
        "env_total": len(envs),
        "vms_by_state": by_state,
        "vms_by_host": by_host,
    }


def queue_rows(store: SqlStore, waiting: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The waiting requests (the scheduler's list_queue, in line order), each with `since`: when
    it was queued (ISO), so the page counts its wait up without a redraw."""
    enqueued = {r.id: r.enqueued_at for r in qs.load_queue(store)}
    out = []
    for w in waiting:
        t = enqueued.get(w["env"], time.time() - float(w.get("waited_s", 0.0)))
        out.append({**w, "since": _iso(t)})
    return out


def _quota_row(scope: str, name: str, q: Quota, used: Usage | None) -> dict[str, Any]:
    used = used or Usage()
    return {
        "scope": scope,
        "name": name,
        **q.to_dict(),
        "used_vms": used.vms,
        "used_cpus": round(used.cpus, 3),
    }


def quota_rows(store: SqlStore) -> list[dict[str, Any]]:
    """Every quota an admin set (user, project, origin kind) with what its user or project
    uses now (VMs being created included)."""
    quotas, use = qs.load_quotas(store), qs.in_use(store)
    return [
        *(_quota_row("user", n, q, use.users.get(n)) for n, q in sorted(quotas.users.items())),
        *(
            _quota_row("project", n, q, use.projects.get(n))
            for n, q in sorted(quotas.projects.items())
        ),
        *(_quota_row("kind", n, Quota(priority=p), None) for n, p in sorted(quotas.kinds.items())),
    ]


def snapshot(
    store: SqlStore,
    hosts: list[dict[str, Any]],
    images: list[dict[str, Any]],
    q: str = "",
    waiting: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict. `waiting` is the scheduler's
    list_queue (for an admin: every waiting request, in line order)."""
    t_end = time.time()
    data = envs_and_vms(store, q)
    queue = queue_rows(store, waiting or [])
    # VMs per host from the scheduler's own records: current, unlike the host's last report.
    per_host = data.pop("vms_by_host")
    caches = cache_rows(hosts)
    hosts = [{**_clean_host(h), "vms": per_host.get(h["id"], 0)} for h in hosts]
    jobs = history.recent(store, 50)
    alive = history.since(store, _iso(t_end - PLOT_WINDOW_S))
    capacity = sum(float(h.get("total", {}).get("cpus", 0)) for h in hosts if h["state"] == "up")
    pool = plots.pool_use(alive, t_end - PLOT_WINDOW_S, t_end)
    return {
        "now": now(),
        "hosts": hosts,
        "images": [
            {k: i.get(k) for k in ("name", "arch", "release", "kernel", "hosts", "warm")}
            for i in images
        ],
        **data,
        "queue": queue,
        "quotas": quota_rows(store),
        "caches": caches,
        "jobs": jobs,
        "plots": {
            "pool": plots.line_plot("vCPUs in use, last hour", pool, capacity),
            "latency": plots.bar_plot(
                "job start latency (request to ready), last 50 jobs", plots.latency_bars(jobs)
            ),
        },
        "counts": {
            "hosts_up": sum(1 for h in hosts if h["state"] == "up"),
            "hosts": len(hosts),
            "queued": len(queue),
        },
    }


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")
