"""Cache volumes on the command line: `tt cache list|del`, the `--cache KEY:/path` flag of
`tt env add` and `tt job run`, and `tt env del` (with `--commit-cache`).

One cache per ENV (one KEY mounted at one path in each VM): enough for a job's dependency
folder; several folders can live in one cache (symlink them into it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from rich.console import Console
from rich.table import Table

from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.cache import CacheSpec, parse_cache

__all__ = ["add_cache_args", "cache_of", "cmd_cache_del", "cmd_cache_list", "cmd_env_del"]

CACHE_HELP = (
    "mount cache KEY at /path in each VM, e.g. deps:/cache: a copy-on-write clone of its newest "
    "version (empty the first time); kept when the job succeeds (`tt job run`; `tt env del "
    "--commit-cache`), discarded otherwise. One per ENV; KEY is yours alone"
)


def _client() -> Client:
    return Client(config.load())


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="KEY:/path", help=CACHE_HELP)


def cache_of(args: argparse.Namespace) -> CacheSpec | None:
    text = getattr(args, "cache", None)
    return parse_cache(text) if text else None


def register_env_del(es: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = es.add_parser("del", help="delete an ENV and all its VMs")
    d.add_argument("name", help="ENV name")
    d.add_argument(
        "--commit-cache",
        action="store_true",
        help="keep what the VMs wrote into the ENV's cache as its newest version (default: "
        "discard it, as for a failed job)",
    )
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_env_del)


def cmd_env_del(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    _client().delete_env(args.name, commit_cache=args.commit_cache)
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps({"name": args.name, "deleted": True, "seconds": round(took, 3)}))
    else:
        print(f"ENV {args.name} deleted in {took:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="your cache volumes (tt env add --cache KEY:/path)")
    cs = p.add_subparsers(dest="cache_cmd", required=True, metavar="ACTION")
    ls = cs.add_parser("list", help="list your caches (an admin: everyone's)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_cache_list)
    d = cs.add_parser("del", help="delete a cache on every host")
    d.add_argument("key", help="the cache's KEY")
    d.add_argument(
        "--project",
        default="",
        help="a CI project's cache, e.g. gitlab:group/proj (default: your own, user:NAME)",
    )
    d.add_argument("--owner", default="", help="(admins) the account that owns it")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_cache_del)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _when(t: float) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def cmd_cache_list(args: argparse.Namespace) -> int:
    rows = _client().caches()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title="caches")
    for col in ("owner", "project", "key", "size", "hosts", "newest", "hits", "commits"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            r["owner"],
            r["project"],
            r["key"],
            _size(r["bytes"]),
            ", ".join(r["hosts"]),
            f"{_when(r['committed_at'])} on {r['newest_host']}" if r["newest_host"] else "-",
            str(r["hits"]),
            str(r["commits"]),
        )
    Console().print(t)
    return 0


def cmd_cache_del(args: argparse.Namespace) -> int:
    out = _client().delete_cache(args.key, args.project, args.owner)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"cache {out['key']} of {out['project']} deleted on {', '.join(out['hosts'])}")
    return 0
