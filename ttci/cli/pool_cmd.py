"""`tt host drain|undrain|forget` and `tt user add|list|del`: running the pool (admins)."""

from __future__ import annotations

import argparse
import json

from ttci.cli import host_install, queue_cmd
from ttci.client import config
from ttci.client.scheduler import Client

__all__ = ["cmd_host", "cmd_user_add", "cmd_user_del", "cmd_user_list", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    h = sub.add_parser(
        "host", help="hosts of the pool: drain, undrain, forget (admin); install this machine"
    )
    hs = h.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (
        ("drain", "stop placing new VMs on a host (its VMs keep running)"),
        ("undrain", "let a drained host take new VMs again"),
        ("forget", "remove a registered host that is down from the pool"),
    ):
        p = hs.add_parser(verb, help=text)
        p.add_argument("host_id", help="the host's id, as `tt status --server` shows it")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=cmd_host)
    host_install.register(hs)

    u = sub.add_parser("user", help="users and their tokens: add, list, del, quota (admin)")
    us = u.add_subparsers(dest="verb", required=True, metavar="VERB")
    a = us.add_parser("add", help="create a user; prints their token once")
    a.add_argument("name", help="user name (lowercase letters, digits, _ or -)")
    a.add_argument("--admin", action="store_true", help="the user may see and act on everything")
    a.add_argument(
        "--service",
        choices=("gitlab", "github"),
        default="",
        help="the account of that CI service: only it (and admins) may name ENVs gl-N / gh-N-N",
    )
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_user_add)
    ls = us.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_user_list)
    d = us.add_parser("del", help="delete a user (their token stops working)")
    d.add_argument("name", help="user name")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_user_del)
    queue_cmd.register_quota(us)


def _client() -> Client:
    return Client(config.load())


def cmd_host(args: argparse.Namespace) -> int:
    c = _client()
    if args.verb == "forget":
        out = c.call_json("DELETE", f"/v1/hosts/{args.host_id}")
    else:
        out = c.call_json("POST", f"/v1/hosts/{args.host_id}/{args.verb}")
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.verb == "forget":
        print(f"host {args.host_id} forgotten")
    else:
        print(f"host {out['id']}: {out['state']}, {'drained' if out['drained'] else 'takes VMs'}")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name, "admin": args.admin}
    if args.service:
        body["service"] = args.service
    out = _client().call_json("POST", "/v1/users", json=body)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        what = " (admin)" if out["admin"] else f" ({args.service} service)" if args.service else ""
        print(f"user {out['name']}{what} created; their token:")
        print(out["token"])
        print("(shown once; keep it in a file or TT_TOKEN, never on a command line)")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    users = _client().call_json("GET", "/v1/users")
    if args.json:
        print(json.dumps(users, indent=2))
    for u in users:
        if not args.json:
            role = " (admin)" if u["admin"] else ""
            role += f" ({u['service']} service)" if u.get("service") else ""
            print(f"{u['name']}{role}  since {u['created_at']}")
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    out = _client().call_json("DELETE", f"/v1/users/{args.name}")
    print(json.dumps(out, indent=2) if args.json else f"user {args.name} deleted")
    return 0
