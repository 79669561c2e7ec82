"""`tt env push` and `tt env get`: files and directories into and out of every VM of an ENV
(a tar through each VM's agent)."""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from ttci.cli.artifacts import archive_root, extract_b64, fresh_dir, max_files
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.errors import BadInput, TTError

__all__ = ["cmd_env_get", "cmd_env_push", "register_files"]

_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # DEST/VM/ stays one folder below DEST


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
    g.add_argument(
        "dest",
        type=Path,
        help="a new or empty local directory; each VM's copy goes into DEST/VM/ (only SRC's "
        "files and directories are taken from a VM: links, devices and other paths are refused)",
    )
    g.add_argument("--overwrite", action="store_true", help="let DEST be a non-empty directory")
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


def _unpack(r: dict[str, Any], dest: Path, want: str, limit: int) -> dict[str, Any]:
    """One VM's answer unpacked into DEST/VM/: {vm, ok, path} or {vm, ok: false, error}. Only
    the requested path's plain files and directories are unpacked (a guest is untrusted)."""
    vm = str(r.get("vm", ""))
    if not _VM_NAME.fullmatch(vm) or vm in (".", ".."):
        return {"vm": vm, "ok": False, "error": f"refused: {vm[:100]!r} is not a VM name"}
    if not r["ok"]:
        return {"vm": vm, "ok": False, "error": f"failed: {r['error']}"}
    target = dest / vm
    try:
        extract_b64(r["data"], target, want, limit)
    except TTError as e:
        return {"vm": vm, "ok": False, "error": f"refused to unpack: {e.message}"}
    return {"vm": vm, "ok": True, "path": str(target)}


def cmd_env_get(args: argparse.Namespace) -> int:
    fresh_dir(args.dest, args.overwrite, "DEST")
    limit = max_files()
    answers = _client().get_files(args.name, args.src, limit)
    results = [_unpack(r, args.dest, archive_root(args.src), limit) for r in answers]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"[{r['vm']}] " + (f"-> {r['path']}" if r["ok"] else r["error"]))
    return 1 if any(not r["ok"] for r in results) else 0
