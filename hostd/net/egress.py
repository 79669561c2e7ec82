"""The ENVs' own nftables tables (their egress allow-lists) through the `nft` tool.

Each table is made once per ENV and left alone afterwards, so the addresses its forwarder put in
its sets and its `denied` counter survive everything but the ENV's deletion.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hostd.builders.egress_plan import (
    Blocked,
    EgressPlan,
    blocked_from_json,
    egress_delete_script,
    egress_table_script,
)
from ttci.infra.proc import run
from ttci.model.errors import CommandFailed

__all__ = ["counters", "delete_table", "ensure_table", "read_blocked", "tables"]

log = logging.getLogger("hostd.net.egress")


def tables(prefix: str) -> list[str]:
    """inet tables whose name starts with prefix (one hostd's ENV tables: `ttci_KEY_`)."""
    out = run(["nft", "list", "tables", "inet"]).stdout.decode().split()
    return sorted(t for t in out if t.startswith(prefix))


def ensure_table(plan: EgressPlan, existing: set[str] | None = None) -> bool:
    """Make the ENV's table unless it exists (then it is kept as it is); True if made."""
    have = existing if existing is not None else set(tables(plan.table))
    if plan.table in have:
        return False
    run(["nft", "-f", "-"], input=egress_table_script(plan).encode())
    return True


def delete_table(table: str) -> None:
    run(["nft", "-f", "-"], input=egress_delete_script(table).encode())


def counters(prefix: str) -> dict[str, int]:
    """table -> its `denied` counter (packets), for every table starting with prefix."""
    doc = _counters_doc()
    out = {}
    for item in doc.get("nftables", []):
        c = item.get("counter")
        if c and c.get("name") == "denied" and str(c.get("table", "")).startswith(prefix):
            out[str(c["table"])] = int(c.get("packets", 0))
    return out


def _counters_doc() -> dict[str, Any]:
    try:
        return dict(json.loads(run(["nft", "-j", "list", "counters"]).stdout or b"{}"))
    except (CommandFailed, ValueError) as e:
        log.warning("cannot read the egress counters: %s", e)
        return {}


def read_blocked(table: str, names: dict[str, set[str]]) -> list[Blocked]:
    """What the ENV's table remembers it denied (or would have), named where the forwarder
    answered for the address."""
    try:
        doc = json.loads(run(["nft", "-j", "list", "set", "inet", table, "seen"]).stdout)
    except (CommandFailed, ValueError):
        return []
    return blocked_from_json(doc, names)
