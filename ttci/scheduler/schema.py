"""The scheduler's tables and their named migrations (applied once, in order, by ttci.infra.db)."""

from __future__ import annotations

from ttci.infra import sql_leases
from ttci.infra.sql import Database, Migration
from ttci.scheduler import history

__all__ = ["MIGRATIONS"]


def _base(db: Database) -> None:
    db.table("hosts").create(
        {"id": str, "url": str, "state": str, "last_seen": str, "info": str}, pk="id"
    )
    db.table("envs").create(
        {
            "name": str,
            "owner": str,
            "os_prefix": str,
            "state": str,
            "created_at": str,
            "expires_at": str,
            "request": str,
            "error": str,
        },
        pk="name",
    )
    db.table("vms").create(
        {
            "id": str,
            "env": str,
            "name": str,
            "host": str,
            "image": str,
            "arch": str,
            "cpus": float,
            "memory_mib": int,
            "disk_gib": int,
            "state": str,
            "error": str,
            "boot_s": float,
            "accel": str,
            "created_at": str,
        },
        pk="id",
    )
    db.table("vms").create_index(["env"])


def _guest_boot(db: Database) -> None:
    db.table("vms").add_column("guest_boot_s", float, not_null_default=0.0)


def _origin(db: Database) -> None:
    db.table("envs").add_column("origin", str, not_null_default='{"kind": "cli"}')


def _host_pool(db: Database) -> None:
    hosts = db.table("hosts")
    hosts.add_column("kind", str, not_null_default="static")
    hosts.add_column("token", str, not_null_default="")
    hosts.add_column("drained", int, not_null_default=0)
    hosts.add_column("error", str, not_null_default="")
    hosts.add_column("seen_mono", float, not_null_default=0.0)


def _users(db: Database) -> None:
    db.table("users").create(
        {"name": str, "admin": int, "token_sha256": str, "created_at": str}, pk="name"
    )
    db.table("users").create_index(["token_sha256"], unique=True)


def _vm_net(db: Database) -> None:
    db.table("vms").add_column("net", str, not_null_default="{}")


def _vm_order(db: Database) -> None:
    db.table("vms").create_index(["env", "name"])  # pages of huge ENVs without sorting
    db.table("vms").create_index(["host", "state"])
    db.table("vms").create_index(["env", "state"])  # per-ENV counts from the index alone


def _admission(db: Database) -> None:
    # The admission queue: one row per waiting ENV (the ENV's row has state "queued").
    db.table("queue").create(
        {"env": str, "request": str, "enqueued_at": float, "deadline": float}, pk="env"
    )
    # Admin settings per user, project (origin project key) or origin kind.
    db.table("quotas").create(
        {"scope": str, "name": str, "vms": int, "cpus": float, "priority": int},
        pk=("scope", "name"),
    )
    db.table("envs").add_column("project", str, not_null_default="")
    db.table("envs").add_column("wait_s", float, not_null_default=0.0)


def _job_wait(db: Database) -> None:
    # How long each job's ENV waited in the queue (the metrics' wait-time histogram).
    db.table("jobs").add_column("wait_s", float, not_null_default=0.0)


def _user_service(db: Database) -> None:
    # The CI service a user account is (users.SERVICES): its ENV names are reserved to it.
    db.table("users").add_column("service", str, not_null_default="")


def _replicas(db: Database) -> None:
    # Several scheduler processes on one database (docs/operator/database.md): heartbeats by
    # the wall clock (seen_mono was one process's monotonic clock), the replica that creates or
    # deletes an ENV (a dead one's are taken back), leases, admin sessions and settings shared.
    db.table("hosts").add_column("seen_at", float, not_null_default=0.0)
    db.table("envs").add_column("worker", str, not_null_default="")
    sql_leases.create_table(db)
    db.table("admin_sessions").create(
        {"id": str, "token_sha256": str, "expires_at": float}, pk="id"
    )
    db.table("meta").create({"name": str, "value": str}, pk="name")
    db.table("counters").create({"name": str, "n": int}, pk="name")
    db.table("counters").insert({"name": "hosts", "n": 0})


MIGRATIONS: list[Migration] = [
    ("0001_base", _base),
    ("0002_guest_boot_s", _guest_boot),
    ("0003_origin", _origin),
    ("0004_host_pool", _host_pool),
    ("0005_users", _users),
    (history.MIGRATION_NAME, history.migrate),
    ("0006_vm_net", _vm_net),
    ("0007_vm_order", _vm_order),
    ("0008_admission", _admission),
    ("0009_job_wait", _job_wait),
    ("0010_user_service", _user_service),
    ("0011_replicas", _replicas),
]
