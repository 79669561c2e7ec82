"""`tt env push` and `tt env get`: files and directories into and out of every VM of an ENV
(a tar through each VM's agent)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.errors import BadInput

__all__ = ["cmd_env_get", "cmd_env_push", "register_files"]


def _client() -> Client:
    return Client(config.load())


def register_files(es: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = es.add_parser("push", help="copy a local file or directory into every VM")
    p.add_argument("name", help="ENV name")
    p.add_argument("src", type=Path, help="local file or directory")
    p.add_argument("dest", help="absolute directory in the VMs (created if missing)")
    p.add_argument("--json", action="store_true", help="print each VM's result as JSON")
    p.set_defaults(func=cmd_env_push)

    g = es.add_parser("get", help="copy a file or directory out of every VM")
    g.add_argument("name", help="ENV name")
    g.add_argument("src", help="absolute path in the VMs")
    g.add_argument("dest", type=Path, help="local directory; each VM's copy goes into DEST/VM/")
    g.add_argument("--json", action="store_true", help="print each VM's result as JSON")
    g.set_defaults(func=cmd_env_get)


def cmd_env_push(args: argparse.Namespace) -> int:
    if not args.src.exists():
        raise BadInput(f"{args.src} does not exist", hint="give a local file or directory")
    if not args.dest.startswith("/"):
        raise BadInput(f"destination {args.dest!r} is not absolute", hint="e.g. /root/src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(args.src, arcname=args.src.resolve().name)
    res = _client().push(args.name, args.dest, buf.getvalue())
    bad = [r for r in res if not r["ok"]]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res:
            print(f"[{r['vm']}] " + ("ok" if r["ok"] else f"failed: {r['error']}"))
    return 1 if bad else 0


def _unpack(r: dict[str, Any], dest: Path) -> dict[str, Any]:
    """One VM's answer unpacked into DEST/VM/: {vm, ok, path} or {vm, ok: false, error}."""
    if not r["ok"]:
        return {"vm": r["vm"], "ok": False, "error": f"failed: {r['error']}"}
    target = dest / r["vm"]
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(r["data"]))) as tar:
            tar.extractall(target, filter="data")
    except tarfile.TarError as e:
        return {"vm": r["vm"], "ok": False, "error": f"refused to unpack: {e}"}
    return {"vm": r["vm"], "ok": True, "path": str(target)}


def cmd_env_get(args: argparse.Namespace) -> int:
    results = [_unpack(r, args.dest) for r in _client().get_files(args.name, args.src)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"[{r['vm']}] " + (f"-> {r['path']}" if r["ok"] else r["error"]))
    return 1 if any(not r["ok"] for r in results) else 0
