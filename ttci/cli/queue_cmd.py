"""`tt queue` (what waits for capacity, and why) and `tt user quota` (caps and priorities)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.errors import BadInput
from ttci.wire.queue import QueueInfo

__all__ = ["cmd_queue", "cmd_quota", "cmd_quotas", "register", "register_quota"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="ENV requests waiting for capacity: position and why")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_queue)


def register_quota(us: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tt user quota ...` and `tt user quotas` (added to `tt user` by pool_cmd)."""
    q = us.add_parser(
        "quota", help="cap a user's (or CI project's) concurrent VMs and vCPUs, set priority"
    )
    q.add_argument("name", nargs="?", help="the user (omit with --project or --kind)")
    q.add_argument("--project", help="a CI project instead, e.g. gitlab:group/app")
    q.add_argument("--kind", help="an origin kind's default priority (cli, gitlab, github, ...)")
    q.add_argument("--vms", type=int, help="at most this many VMs at once")
    q.add_argument("--cpus", type=float, help="at most this many vCPUs at once")
    q.add_argument("--priority", type=int, help="higher goes first in the queue (default 0)")
    q.add_argument("--clear", action="store_true", help="remove the setting")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_quota)
    ls = us.add_parser("quotas", help="list the quotas and priorities set")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_quotas)


def _client() -> Client:
    return Client(config.load())


def cmd_queue(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = _client().call_json("GET", "/v1/queue")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("nothing waits: every ENV request got its VMs")
    for r in rows:
        info = QueueInfo.from_dict(r)
        print(f"{info.position:>3}. {r['env']} ({r['owner']}, {r['project']}): {info.sentence()}")
    return 0


def _scope(args: argparse.Namespace) -> tuple[str, str]:
    given = [(s, v) for s, v in (("user", args.name), ("project", args.project)) if v]
    given += [("kind", args.kind)] if args.kind else []
    if len(given) != 1:
        raise BadInput(
            "name exactly one of: a user, --project KEY or --kind KIND",
            hint="e.g. `tt user quota alice --vms 4` or `tt user quota --project gitlab:g/app`",
        )
    return given[0]


def cmd_quota(args: argparse.Namespace) -> int:
    scope, name = _scope(args)
    c = _client()
    if args.clear:
        out = c.call_json("DELETE", f"/v1/quotas/{scope}/{quote(name, safe='')}")
    else:
        body = {"scope": scope, "name": name, "vms": args.vms, "cpus": args.cpus}
        out = c.call_json("PUT", "/v1/quotas", json={**body, "priority": args.priority})
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.clear:
        print(f"{scope} {name}: quota removed")
    else:
        print(f"{scope} {name}: {_words(out)}")
    return 0


def _words(q: dict[str, Any]) -> str:
    parts = [
        f"at most {q['vms']} VMs" if q.get("vms") is not None else "",
        f"at most {q['cpus']:g} vCPUs" if q.get("cpus") is not None else "",
        f"priority {q['priority']}" if q.get("priority") is not None else "",
    ]
    return ", ".join(p for p in parts if p) or "no limits"


def cmd_quotas(args: argparse.Namespace) -> int:
    out: dict[str, Any] = _client().call_json("GET", "/v1/quotas")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for scope in ("users", "projects"):
        for name, q in sorted(out.get(scope, {}).items()):
            print(f"{scope[:-1]} {name}: {_words(q)}")
    for kind, prio in sorted(out.get("kinds", {}).items()):
        print(f"kind {kind}: priority {prio}")
    return 0
