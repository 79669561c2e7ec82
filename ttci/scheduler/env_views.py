"""The read side of ENVs: their JSON, pages and streams of VMs, lists."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from ttci.model.errors import TTError
from ttci.scheduler.core import SchedulerCore
from ttci.scheduler.users import User

__all__ = ["EnvViews"]

# One page of an ENV's VMs as the API shows them (EnvViews._vm_json), written by SQLite:
# (total VMs of the ENV, VMs on the page, the page as a JSON array). Parameters: env, env, limit,
# offset.
_VM_FIELDS = (
    "name",
    "image",
    "arch",
    "host",
    "state",
    "cpus",
    "memory_mib",
    "disk_gib",
    "accel",
    "boot_s",
    "guest_boot_s",
    "error",
)
_NET = "case when json_valid(net) then net else '{}' end"
_PAGE_SQL = (
    "select (select count(*) from vms where env = ?), json_array_length(page), page from "  # noqa: S608
    "(select json_group_array(json_object("
    + ", ".join(f"'{k}', {k}" for k in _VM_FIELDS)
    + f", 'ip', coalesce(json_extract({_NET}, '$.ip'), '')"
    + f", 'ports', json(coalesce(json_extract({_NET}, '$.ports'), '[]'))"
    + ")) as page from (select * from vms where env = ? order by name limit ? offset ?))"
)


class EnvViews(SchedulerCore):
    VM_KEYS = _VM_FIELDS

    def env_json(
        self, row: dict[str, Any], vms: bool = True, counts: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """counts: the ENV's VMs by state, when the caller read them already (list_envs)."""
        out = {
            k: row[k]
            for k in ("name", "owner", "os_prefix", "state", "created_at", "expires_at", "error")
        }
        out["origin"] = json.loads(row.get("origin") or '{"kind": "cli"}')
        if counts is None:
            counts = dict(
                self.store.db.execute(
                    "select state, count(*) from vms where env = ? group by state", [row["name"]]
                ).fetchall()
            )
        if row["state"] == "queued" and (info := self.queue_info(row["name"])) is not None:
            out["queue"] = info.to_dict()
        out["vm_count"] = sum(counts.values())
        out["lost"] = counts.get("lost", 0)
        if vms:
            out["vms"] = [self._vm_json(v) for v in self._vm_rows(row["name"])]
        return out

    def _vm_json(self, v: dict[str, Any]) -> dict[str, Any]:
        net = json.loads(v.get("net") or "{}")
        return {
            **{k: v[k] for k in self.VM_KEYS},
            "ip": net.get("ip", ""),
            "ports": net.get("ports", []),
        }

    def page_vms(self, name: str, user: User, offset: int, limit: int) -> dict[str, Any]:
        """One page of a (possibly huge) ENV's VMs, in name order."""
        self._env_row(name, user)
        rows = self.store.db.table("vms").rows_packed(
            (*self.VM_KEYS, "net"), "env = ?", [name], order_by="name", limit=limit, offset=offset
        )
        total = self.store.db.table("vms").count_where("env = ?", [name])
        nxt = offset + len(rows)
        return {
            "env": name,
            "total": total,
            "offset": offset,
            "vms": [self._vm_json(v) for v in rows],
            "next_offset": nxt if nxt < total else None,
        }

    def page_vms_body(
        self, name: str, user: User, offset: int, limit: int, dumps: Callable[[Any], str]
    ) -> bytes:
        """page_vms as the API's JSON body. On SQLite, SQLite writes the page's VMs as JSON
        itself (one step, no decoding and encoding again in Python: the API's heaviest frequent
        read); elsewhere dumps encodes page_vms."""
        if self.store.db.dialect != "sqlite" or self.store.db.in_transaction():
            return dumps(self.page_vms(name, user, offset, limit)).encode() + b"\n"
        self._env_row(name, user)
        row = self.store.db.execute(_PAGE_SQL, [name, name, limit, offset]).fetchone()
        total, n, vms = int(row[0]), int(row[1]), str(row[2])
        nxt = offset + n
        head = {
            "env": name,
            "total": total,
            "offset": offset,
            "next_offset": nxt if nxt < total else None,
        }
        return dumps(head)[:-1].encode() + b', "vms": ' + vms.encode() + b"}\n"

    def iter_vms(self, name: str, user: User, batch: int = 2000) -> Iterator[dict[str, Any]]:
        """Every VM of the ENV, read in batches (for NDJSON streams)."""
        offset = 0
        while True:
            page = self.page_vms(name, user, offset, batch)
            yield from page["vms"]
            if page["next_offset"] is None:
                return
            offset = page["next_offset"]

    def list_envs(self, user: User, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        where, args = ("1=1", []) if user.admin else ("owner = ?", [user.name])
        with self.store.db.snapshot():  # the page and its VM counts from one state
            rows = self.store.db.table("envs").rows_where(
                where, args, order_by="created_at, name", offset=offset, limit=limit
            )
            counts: dict[str, dict[str, int]] = {r["name"]: {} for r in rows}
            if rows:
                page = f"select name from envs where {where} order by created_at, name"  # noqa: S608
                grouped = self.store.db.execute(
                    f"select env, state, count(*) from vms where env in ({page} "  # noqa: S608
                    f"limit {int(limit)} offset {int(offset)}) group by env, state",
                    args,
                ).fetchall()
                for env, state, n in grouped:
                    counts[env][state] = int(n)
        return [self.env_json(r, vms=False, counts=counts[r["name"]]) for r in rows]

    def show_env(self, name: str, user: User, vms: bool = True) -> dict[str, Any]:
        row = self._env_row(name, user)
        out = self.env_json(row, vms=vms)
        if vms and row["state"] == "ready" and (egress := self._egress(name)):
            out["egress"] = egress
        return out

    def _egress(self, env: str) -> dict[str, Any]:
        """The ENV's egress allow-list as its hosts enforce it (theirs and the operator's
        rules), with the connections denied summed over them and where to; {} when none of
        its hosts filters its egress (or none answers)."""
        hosts = sorted({v["host"] for v in self._vm_rows(env) if v["state"] == "running"})
        parts = []
        for h in hosts:
            try:
                parts.append(self._client(h).egress(env))
            except TTError:
                continue  # shown without that host's numbers
        parts = [p for p in parts if p.get("mode") in ("enforce", "audit")]
        if not parts:
            return {}
        blocked = {(b["addr"], b["proto"], b["port"]): b for p in parts for b in p["blocked"]}
        return {
            "mode": parts[0]["mode"],
            "allow": sorted({r for p in parts for r in p["allow"]}),
            "denied": sum(int(p["denied"]) for p in parts),
            "blocked": [blocked[k] for k in sorted(blocked)],
        }
