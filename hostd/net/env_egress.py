"""DNS and egress of a hostd's ENVs: each ENV that may go out gets a forwarder on its gateway
(hostd.net.dns) and, with an allow-list (its own and the operator's), a table of its own
(hostd.net.egress). NetManager records the ENV first and calls this to make, read and remove
them; the rules themselves are hostd.builders.egress_plan's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

from hostd.builders.egress_plan import EgressPlan, egress_table_name
from hostd.builders.net_plan import EnvNet
from hostd.net import egress
from hostd.net.dns import Forwarders
from ttci.model.egress import EgressRule, egress_text, merge_rules, parse_egress
from ttci.model.errors import TTError

__all__ = ["EnvEgress", "blocked_text"]

log = logging.getLogger("hostd.net")


class EnvEgress:
    def __init__(
        self,
        host_key: str,
        forwarders: Forwarders,
        upstreams: tuple[str, ...],
        default_rules: tuple[EgressRule, ...],
    ) -> None:
        self.key = host_key
        self.prefix = f"ttci_{host_key}_"  # the ENVs' tables (the hostd's own is ttci_KEY)
        self.dns = forwarders
        self.upstreams = upstreams
        self.default_rules = default_rules

    def plan(self, row: dict[str, Any]) -> EgressPlan:
        """The ENV's DNS and egress from its `nets` row, with the operator's list added."""
        net = EnvNet(row["env"], row["bridge"], ipaddress.IPv4Network(row["subnet"]))
        own = parse_egress(json.loads(row.get("egress") or "[]"))
        return EgressPlan(
            env=row["env"],
            table=egress_table_name(self.key, row["bridge"]),
            bridge=row["bridge"],
            gateway=net.gateway,
            rules=merge_rules(own, self.default_rules),
            audit=bool(row.get("egress_audit")),
            upstreams=self.upstreams,
        )

    def ensure(self, row: dict[str, Any]) -> tuple[str, ...]:
        """The ENV's table and forwarder, made unless there; the resolvers of its guests."""
        if row["deny_outgoing"]:
            return ()  # resolves nothing, reaches nothing outside
        plan = self.plan(row)
        t0 = time.monotonic()
        made = plan.filtered and egress.ensure_table(plan)
        started = bool(self.upstreams) and self.dns.ensure(plan)
        if made or started:
            log.info(
                "ENV %s: egress %s%s, DNS %s, in %.0f ms",
                plan.env,
                plan.mode,
                f" ({', '.join(egress_text(plan.rules))})" if plan.rules else "",
                "via " + ",".join(self.upstreams) if self.upstreams else "none",
                (time.monotonic() - t0) * 1000,
            )
        return (str(plan.gateway),) if self.upstreams else ()

    def drop(self, row: dict[str, Any]) -> None:
        """Stop the ENV's forwarder and delete its table (saying first what it denied)."""
        plan = self.plan(row)
        if plan.filtered and not row["deny_outgoing"]:
            with contextlib.suppress(TTError):
                info = self.info(row)
                log.info(
                    "ENV %s egress (%s): %d denied; %s",
                    plan.env,
                    plan.mode,
                    info["denied"],
                    blocked_text(info["blocked"]) or "nothing blocked",
                )
        self.dns.stop(plan.env)
        with contextlib.suppress(TTError):
            if plan.table in egress.tables(plan.table):
                egress.delete_table(plan.table)

    def reconcile(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Tables and forwarders exactly for rows (kept as they are where they exist)."""
        plans = {r["env"]: self.plan(r) for r in rows if not r["deny_outgoing"]}
        wanted = {p.table for p in plans.values() if p.filtered}
        existing = set(egress.tables(self.prefix))
        counts = {"egress_tables_reaped": 0}
        for t in existing - wanted:
            egress.delete_table(t)
            counts["egress_tables_reaped"] += 1
        for p in plans.values():
            if p.filtered:
                egress.ensure_table(p, existing)
        counts.update(self.dns.reconcile(plans if self.upstreams else {}))
        return counts

    def teardown(self) -> None:
        self.dns.stop_all()
        for t in egress.tables(self.prefix):
            with contextlib.suppress(TTError):
                egress.delete_table(t)

    def info(self, row: dict[str, Any]) -> dict[str, Any]:
        """mode (open, enforce, audit or deny), the allow-list, the resolver, how many
        connections were denied (or, in audit mode, would have been) and to where."""
        env = row["env"]
        if row["deny_outgoing"]:
            return {"env": env, "mode": "deny", "allow": [], "resolver": "", "denied": 0,
                    "blocked": []}  # fmt: skip
        plan = self.plan(row)
        blocked = []
        if plan.filtered:
            names = self.dns.answers(env, plan.bridge) if plan.audit else {}
            blocked = [b.to_dict() for b in egress.read_blocked(plan.table, names)]
        return {
            "env": env,
            "mode": plan.mode,
            "allow": egress_text(plan.rules),
            "resolver": str(plan.gateway) if self.upstreams else "",
            "denied": egress.counters(plan.table).get(plan.table, 0) if plan.filtered else 0,
            "blocked": blocked,
        }

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
        """ENV -> (mode, connections denied or, in audit mode, that would have been)."""
        counters = egress.counters(self.prefix)
        out = {}
        for r in rows:
            plan = self.plan(r)
            if plan.filtered and not r["deny_outgoing"]:
                out[r["env"]] = (plan.mode, counters.get(plan.table, 0))
        return out


def blocked_text(blocked: list[dict[str, Any]]) -> str:
    """`other.example.com 10.0.0.7:80/tcp, ...` (the first 20)."""
    return ", ".join(
        f"{'/'.join(b['names']) + ' ' if b['names'] else ''}{b['addr']}:{b['port']}/{b['proto']}"
        for b in blocked[:20]
    )
