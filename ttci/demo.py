"""`tt demo`: the embedded default job. Builds a small os x arch matrix of images, boots each VM,
runs a command through its agent, prints the results, and tears everything down."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from hostd.direct_vm import boot
from hostd.images.build import build_image
from hostd.images.catalogue import Image
from hostd.images.check import choose_accel
from hostd.images.recipe import BuildSpec
from ttci.naming import parse_arch, parse_release
from ttci.settings import add_setting

out = Console(width=None if sys.stdout.isatty() else 160)
MATRIX_OS = ("debian-12", "debian-13")
MATRIX_ARCH = ("amd64", "arm64")
JOB = (
    'echo "hello from $(uname -m) running $(. /etc/os-release; echo $PRETTY_NAME)"; '
    "python3 -c 'import platform; print(\"python\", platform.python_version())'"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "demo", help="build images and run a small os x arch matrix job in fresh VMs"
    )
    d.add_argument("--os", action="append", help=f"matrix os (default {', '.join(MATRIX_OS)})")
    d.add_argument(
        "--arch", action="append", help=f"matrix arch (default {', '.join(MATRIX_ARCH)})"
    )
    for s in ("image-path", "cache-dir", "state-dir", "mirror"):
        add_setting(d, s)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    cells = [
        (parse_release(o), parse_arch(a))
        for o in (args.os or MATRIX_OS)
        for a in (args.arch or MATRIX_ARCH)
    ]
    out.print(
        f"[bold]matrix:[/bold] {len(cells)} jobs: "
        + ", ".join(f"{r.name}/{a.value}" for r, a in cells),
        highlight=False,
    )
    rows = []
    failed = 0
    for n, (release, arch) in enumerate(cells, 1):
        spec = BuildSpec(release=release, arch=arch, mirror=args.mirror)
        out.print(f"[bold]({n}/{len(cells)}) {spec.name}[/bold]: image", highlight=False)
        manifest, _ = build_image(spec, args.image_path, args.cache_dir)
        image = Image(manifest, args.image_path / spec.name.dirname)
        accel, _why = choose_accel(image, args.state_dir)
        out.print(f"  booting a fresh VM ({accel}) and running the job ...", highlight=False)
        with boot(manifest, image.path, accel=accel) as vm, vm.connect() as agent:
            boot_s = time.monotonic() - vm.started
            status, stdout, stderr = agent.output(["/bin/sh", "-c", JOB])
        text = (stdout + stderr).decode(errors="replace").strip()
        for line in text.splitlines():
            out.print(f"  [{spec.name}] {line}", highlight=False, markup=False)
        failed += not status.ok
        rows.append(
            (
                release.name,
                arch.value,
                accel,
                f"{boot_s:.1f} s",
                "ok" if status.ok else f"failed ({status.code})",
            )
        )
    t = Table(title="matrix results (every VM is gone again)")
    for col in ("os", "arch", "accel", "VM up", "job"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    out.print(t)
    return 1 if failed else 0
