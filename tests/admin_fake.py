"""A scheduler state with many ENVs and VMs but no VM booted: registered host records (through the
scheduler's own registration) and rows inserted straight into its SQLite state. For the admin
page's tests and bench/admin.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from ttci.scheduler import admission_store, history
from ttci.scheduler.planning.admission import Quota
from ttci.scheduler.service import Scheduler
from ttci.scheduler.users import User
from ttci.wire.api import API_VERSION
from ttci.wire.envs import EnvRequest
from ttci.wire.hosts import HostRegistration

HOST_TOKEN = "host-secret-" + "h" * 20
IMAGES = ["qemu:debian-12:amd64", "qemu:debian-12:arm64", "qemu:debian-13:amd64"]
KINDS = ["gitlab", "github", "jenkins", "cli"]


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def fake_scheduler(
    state_dir: Path,
    admin_token: str,
    vms: int,
    *,
    per_env: int = 1,
    hosts: int = 4,
    jobs: int = 200,
    database: str = "",
) -> Scheduler:
    """A Scheduler whose state holds `vms` running VMs in ENVs of `per_env`, on fake hosts
    (database: --database, "" for SQLite in state_dir)."""
    s = Scheduler(state_dir, {}, admin_token=admin_token, host_timeout=3600, database=database)
    for h in range(hosts):
        s.pool.register(
            HostRegistration.from_dict(
                {
                    "id": f"fake-{h}",
                    "url": f"http://127.0.0.1:{9 + h}",
                    "api": API_VERSION,
                    "token": HOST_TOKEN,
                    "info": {
                        "machine": "x86_64",
                        "accel": "kvm" if h % 2 else "tcg",
                        "total": {"cpus": 64, "memory_mib": 262144, "disk_gib": 2000},
                        "used": {
                            "cpus": vms / hosts,
                            "memory_mib": 512 * vms // hosts,
                            "disk_gib": 0,
                        },
                        "free": {"cpus": 64, "memory_mib": 262144, "disk_gib": 2000},
                        "vms": vms // hosts,
                        "images": [{"name": i, "arch": i.rsplit(":", 1)[1]} for i in IMAGES],
                    },
                }
            )
        )
    now = dt.datetime.now(dt.UTC)
    env_rows, vm_rows = [], []
    for e in range((vms + per_env - 1) // per_env):
        kind = KINDS[e % len(KINDS)]
        name = f"ci-{e:05d}"
        created = now - dt.timedelta(seconds=30 + e)
        env_rows.append(
            {
                "name": name,
                "owner": "admin",
                "os_prefix": IMAGES[e % len(IMAGES)],
                "state": "ready",
                "created_at": _iso(created),
                "expires_at": _iso(created + dt.timedelta(hours=1)),
                "request": "{}",
                "error": "",
                "origin": json.dumps(
                    {
                        "kind": kind,
                        "job": str(1000 + e),
                        "url": f"https://ci.example.org/{kind}/jobs/{1000 + e}",
                        "project": "group/project",
                        "runner": "runner-1",
                    }
                ),
            }
        )
        for v in range(min(per_env, vms - e * per_env)):
            vm_rows.append(
                {
                    "id": uuid.uuid4().hex[:12],
                    "env": name,
                    "name": f"debian-12-amd64-{v + 1}",
                    "host": f"fake-{(e + v) % hosts}",
                    "image": IMAGES[e % len(IMAGES)],
                    "arch": "amd64",
                    "cpus": 1.0,
                    "memory_mib": 512,
                    "disk_gib": 4,
                    "state": "running",
                    "error": "",
                    "boot_s": 4.2,
                    "accel": "tcg",
                    "created_at": _iso(created),
                    "guest_boot_s": 2.0,
                }
            )
    with s.store.lock:
        s.store.db.table("envs").insert_all(env_rows)
        s.store.db.table("vms").insert_all(vm_rows)
        s.store.db.table("jobs").insert_all(
            [
                _job(now - dt.timedelta(minutes=59) + dt.timedelta(seconds=15 * j), j)
                for j in range(jobs)
            ]
        )
    return s


def queue_requests(s: Scheduler) -> list[str]:
    """Three waiting requests that are never granted (so no fake host is asked to boot): bob's
    60-CPU VM waits for capacity (and holds room), alice's two wait for her quota of 0 VMs."""
    admission_store.set_quota(s.store, "user", "alice", Quota(vms=0))
    asks = [
        ("big", "bob", EnvRequest("big", IMAGES[0], cpus=60, origin=_origin("gitlab", "g/p"))),
        ("q1", "alice", EnvRequest("q1", IMAGES[0], origin=_origin("github", "o/r"))),
        ("q2", "alice", EnvRequest("q2", "qemu:debian-12", origin={"kind": "cli"})),
    ]
    for _, owner, req in asks:
        s.submit_env(req, User(owner))
    return [name for name, _, _ in asks]


def _origin(kind: str, project: str) -> dict[str, str]:
    return {"kind": kind, "project": project, "job": "7"}


def _job(created: dt.datetime, j: int) -> dict[str, object]:
    kind = KINDS[j % len(KINDS)]
    return {
        "env": f"old-{j:05d}",
        "owner": "admin",
        "kind": kind,
        "origin": json.dumps({"kind": kind, "job": str(j)}),
        "os_prefix": IMAGES[j % len(IMAGES)],
        "created_at": _iso(created),
        "ready_at": _iso(created + dt.timedelta(seconds=5 + j % 7)),
        "deleted_at": _iso(created + dt.timedelta(seconds=60 + j % 120)),
        "ready_s": 5.0 + j % 7,
        "wait_s": 30.0 * (j % 5),
        "vm_count": 1 + j % 3,
        "cpus": float(1 + j % 3),
        "memory_mib": 512,
        "images": IMAGES[j % len(IMAGES)],
        "result": history.RESULTS[j % len(history.RESULTS)],
        "reported_at": "",
    }
