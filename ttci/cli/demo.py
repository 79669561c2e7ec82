"""`tt demo`: the main job on the embedded default. Builds the images of a small os x arch
matrix, starts the all-in-one cloud (`tt up`'s stack), creates one ENV with a fresh VM per
matrix cell, runs the job on all of them at once, prints the results and tears everything down."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ttci.cli import allinone
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.infra.proc import run_streaming
from ttci.infra.settings import add_setting
from ttci.model.arch import Arch
from ttci.model.naming import Release, parse_arch, parse_release
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest, parse_duration

__all__ = ["JOB", "MATRIX_ARCH", "MATRIX_OS", "cmd_demo", "register"]

out = Console(width=None if sys.stdout.isatty() else 160)
MATRIX_OS = ("debian-12", "debian-13")
MATRIX_ARCH = ("amd64", "arm64")
JOB = (
    'echo "hello from $(uname -m), $(. /etc/os-release; echo $PRETTY_NAME)"; '
    "python3 -c 'import platform; print(\"python\", platform.python_version())'; "
    "git --version"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("demo", help="run a small os x arch matrix job in fresh VMs, end to end")
    d.add_argument("--os", action="append", help=f"matrix os (default {', '.join(MATRIX_OS)})")
    d.add_argument(
        "--arch", action="append", help=f"matrix arch (default {', '.join(MATRIX_ARCH)})"
    )
    d.add_argument("--cmd", default=JOB, help="the job's shell command")
    d.add_argument(
        "--json",
        action="store_true",
        help="print only the results as JSON on stdout (the progress goes to stderr)",
    )
    for s in ("image-path", "cache-dir", "mirror"):
        add_setting(d, s)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    con = Console(stderr=True) if args.json else out  # --json: stdout holds the JSON alone
    cells = [
        (parse_release(o), parse_arch(a))
        for o in (args.os or MATRIX_OS)
        for a in (args.arch or MATRIX_ARCH)
    ]
    names = [f"qemu:{r.name}:{a.value}" for r, a in cells]
    con.print(
        f"[bold]matrix[/bold]: {len(cells)} jobs: "
        + ", ".join(f"{r.name}/{a.value}" for r, a in cells),
        highlight=False,
    )
    con.print("[bold]1. images[/bold] (built once, then cached)", highlight=False)
    _build_images(args, cells, con)
    with tempfile.TemporaryDirectory(prefix="tt-demo-") as tmp:
        con.print(
            "[bold]2. starting the all-in-one cloud[/bold] (scheduler, hostd, libvirtd)",
            highlight=False,
        )
        with allinone.running(
            Path(tmp),
            args.image_path,
            scheduler_listen=f"127.0.0.1:{_free_port()}",
            hostd_listen=f"127.0.0.1:{_free_port()}",
        ) as stack:
            client = Client(config.ClientConfig(stack.scheduler, stack.token))
            shown, results = _run_job(client, ",".join(names), args.cmd, con)
        if args.json:
            print(json.dumps(_results_json(shown, results), indent=2))
        t = Table(title="matrix results (every VM is gone again)")
        for col in ("VM", "image", "accel", "boot", "job"):
            t.add_column(col)
        for vm in shown["vms"]:
            t.add_row(
                vm["name"],
                vm["image"],
                vm["accel"],
                f"{vm['boot_s']:.1f} s",
                results.get(vm["name"], "no result"),
            )
        con.print(t)
    failed = [r for r in results.values() if r != "ok"]
    return 1 if failed or len(results) != len(cells) else 0


def _results_json(shown: dict[str, Any], results: dict[str, str]) -> dict[str, Any]:
    vms = [
        {
            "name": vm["name"],
            "image": vm["image"],
            "accel": vm["accel"],
            "boot_s": vm["boot_s"],
            "result": results.get(vm["name"], "no result"),
        }
        for vm in shown["vms"]
    ]
    return {"ok": all(v["result"] == "ok" for v in vms), "vms": vms}


def _build_images(
    args: argparse.Namespace, cells: list[tuple[Release, Arch]], con: Console
) -> None:
    for release in dict.fromkeys(r for r, _ in cells):
        arches = [a.value for r, a in cells if r == release]
        # The image builder is hostd's: run it as hostd's own command, whose progress shows live.
        run_streaming(
            [
                *allinone.python_main("hostd.cli.main"),
                "image",
                "build",
                release.name,
                *[x for a in arches for x in ("--arch", a)],
                "--image-path",
                str(args.image_path),
                "--cache-dir",
                str(args.cache_dir),
                "--mirror",
                args.mirror,
            ],
            on_line=lambda line: con.print(f"   {line}", highlight=False, markup=False),
            env={k: v for k, v in os.environ.items() if k.startswith("TT_")},
        )


def _run_job(
    client: Client, prefix: str, cmd: str, con: Console
) -> tuple[dict[str, Any], dict[str, str]]:
    """Steps 3-5: the ENV, the job on all its VMs, the ENV deleted. Returns the ENV as it was
    shown and each VM's result."""
    con.print(f"[bold]3. tt env add demo --os-prefix {prefix}[/bold]", highlight=False)
    t0 = time.monotonic()
    env = client.create_env(
        EnvRequest("demo", prefix, memory_mib=512, life_s=parse_duration("15m"))
    )
    con.print(
        f"   {env['vm_count']} fresh VMs up in {time.monotonic() - t0:.1f} s", highlight=False
    )
    con.print("[bold]4. tt env run demo --cmd ...[/bold]", highlight=False)
    results: dict[str, str] = {}
    for ev in client.exec("demo", ExecRequest.shell(cmd)):
        if ev.kind in (EventKind.STDOUT, EventKind.STDERR):
            for line in ev.data.decode(errors="replace").splitlines():
                con.print(f"   [{ev.vm}] {line}", highlight=False, markup=False)
        elif ev.status is not None:
            results[ev.vm] = "ok" if ev.status.ok else f"exit {ev.status.code}"
        elif ev.kind is EventKind.ERROR:
            results[ev.vm] = f"error: {ev.message}"
    shown = client.show_env("demo")
    con.print("[bold]5. tt env del demo[/bold]", highlight=False)
    t1 = time.monotonic()
    client.delete_env("demo")
    con.print(f"   deleted in {time.monotonic() - t1:.1f} s", highlight=False)
    return shown, results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
