"""The `image` verbs, shared by `tt image ...` and `tt-hostd image ...` (operator side, local)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from hostd.builders.image_recipe import DEFAULT_TARGETS, AddedFile, BuildSpec
from hostd.cli.image_transfer_cmd import register_transfer
from hostd.images.build import Builder, prune_cache
from hostd.images.catalogue import find, scan
from hostd.images.recipes import load_recipe
from hostd.images.transfer import remove_partial
from hostd.vm.disk import prune_image_volumes
from hostd.vm.image_check import CheckResult, check_image
from hostd.vm.schema import open_store
from hostd.vm.templates import Templates
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.infra.settings import add_setting
from ttci.model.errors import BadInput, TTError
from ttci.model.manifest import Manifest
from ttci.model.naming import parse_arch, parse_profile, parse_release
from ttci.model.units import parse_duration_s

__all__ = [
    "cmd_build",
    "cmd_check",
    "cmd_list",
    "cmd_list_pool",
    "cmd_prune",
    "cmd_warm",
    "local_templates",
    "parse_size",
    "parse_vm_size",
    "register",
    "register_pool",
    "specs_from_args",
]

out = Console(width=None if sys.stdout.isatty() else 160)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise BadInput(f"size {text!r} does not parse", hint="write e.g. 4G or 2048M") from None


def register_pool(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tt image ...` (found by `tt` through the ttci.commands entry point)."""
    register(sub, pool=True)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, pool: bool = False
) -> None:
    """The image verbs; with pool, `list` asks the scheduler unless --local is given."""
    image = sub.add_parser("image", help="build, check and list guest images on this host")
    isub = image.add_subparsers(dest="image_cmd", required=True, metavar="VERB")
    _register_build(isub)

    c = isub.add_parser("check", help="boot an image and run `uname -m` through its agent")
    c.add_argument("names", nargs="*", help="image names or unique prefixes")
    c.add_argument("--all", action="store_true", help="check every image on this host")
    c.add_argument("--json", action="store_true", help="print results as JSON")
    c.add_argument(
        "--timeout",
        default="90",
        metavar="DURATION",
        help="how long to wait for the agent, e.g. 90s, 5m (default 90 s)",
    )
    add_setting(c, "image-path")
    c.set_defaults(func=cmd_check)

    _register_prune_and_warm(isub)
    register_transfer(isub)

    if pool:
        ls = isub.add_parser("list", help="list the pool's images (--local: this host's)")
        ls.add_argument("--local", action="store_true", help="list this host's --image-path")
        ls.set_defaults(func=_list_pool_or_local)
    else:
        ls = isub.add_parser("list", help="list the images on this host (and broken ones)")
        ls.set_defaults(func=cmd_list)
    ls.add_argument("--json", action="store_true", help="print as JSON")
    add_setting(ls, "image-path")
    add_setting(ls, "state-dir")


def _register_build(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = isub.add_parser("build", help="build a guest image from Debian packages with mmdebstrap")
    b.add_argument("release", nargs="?", help="OS-RELEASE, e.g. debian-12 (omit with --default)")
    b.add_argument(
        "-f",
        "--file",
        type=Path,
        metavar="RECIPE",
        help="build what a YAML recipe declares (ci-templates/recipes/); --arch picks some of "
        "its architectures",
    )
    b.add_argument("--arch", action="append", default=[], help="Debian architecture (repeatable)")
    b.add_argument("--default", action="store_true", help="build the nine default images")
    b.add_argument(
        "--profile", default="agent", help="agent (boot straight to the agent) or systemd"
    )
    b.add_argument("--package", action="append", default=[], help="extra Debian package")
    b.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="SRC:DEST",
        help="copy a host file or directory into the image",
    )
    b.add_argument("--size", help="disk size of the image (default 4G)")
    b.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    b.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=os.cpu_count() or 1,
        help="images built at once (default: one per core)",
    )
    b.add_argument(
        "--json",
        action="store_true",
        help="print only the manifests as JSON on stdout (progress goes to stderr)",
    )
    for s in ("image-path", "cache-dir", "mirror"):
        add_setting(b, s)
    b.set_defaults(func=cmd_build)


def _register_prune_and_warm(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pr = isub.add_parser(
        "prune",
        help="remove build-cache trees no image here was made from, and the snapshot "
        "templates of images that are gone or were rebuilt",
    )
    pr.add_argument("--json", action="store_true", help="print what was removed as JSON")
    add_setting(pr, "image-path")
    add_setting(pr, "cache-dir")
    add_setting(pr, "state-dir")
    pr.set_defaults(func=cmd_prune)

    w = isub.add_parser(
        "warm", help="make snapshot templates now (VMs of that image and size then start warm)"
    )
    w.add_argument("names", nargs="+", help="image names or unique prefixes")
    w.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="CPUSxMIB[xGIB]",
        help="VM size to warm, e.g. 1x512 or 2x1024x8 (repeatable; default 1x512)",
    )
    w.add_argument("--json", action="store_true", help="print the templates made as JSON")
    add_setting(w, "image-path")
    add_setting(w, "hostd-listen")
    add_setting(w, "hostd-token")
    w.set_defaults(func=cmd_warm)


def _recipe_specs(args: argparse.Namespace) -> list[BuildSpec]:
    given = [
        flag
        for flag, value in (
            ("RELEASE", args.release),
            ("--default", args.default),
            ("--package", args.package),
            ("--add", args.add),
            ("--size", args.size),
            ("--profile", args.profile != "agent"),
        )
        if value
    ]
    if given:
        raise BadInput(
            f"-f builds what the recipe says; {', '.join(given)} cannot be added to it",
            hint="write them into the recipe (base, packages, files, size)",
        )
    recipe = load_recipe(args.file)
    arches = tuple(parse_arch(a) for a in args.arch)
    return recipe.specs(args.mirror, arches)


def specs_from_args(args: argparse.Namespace) -> list[BuildSpec]:
    if getattr(args, "file", None):
        return _recipe_specs(args)
    size = parse_size(args.size or "4G")
    adds = tuple(AddedFile.parse(a) for a in args.add)
    profile = parse_profile(args.profile)
    if args.default:
        if args.release or args.arch:
            raise BadInput("--default builds the default set", hint="drop RELEASE and --arch")
        targets = [(parse_release(r), a) for r, a in DEFAULT_TARGETS]
    else:
        if not args.release:
            raise BadInput("which release?", hint="tt image build debian-12 --arch arm64")
        release = parse_release(args.release)
        arches = [parse_arch(a) for a in args.arch] or [parse_arch("amd64")]
        targets = [(release, a) for a in arches]
    return [
        BuildSpec(
            release=r,
            arch=a,
            profile=profile,
            packages=tuple(args.package),
            adds=adds,
            disk_size=size,
            mirror=args.mirror,
        )
        for r, a in targets
    ]


def cmd_build(args: argparse.Namespace) -> int:
    specs = list(dict.fromkeys(specs_from_args(args)))
    if args.jobs < 1:
        raise BadInput(f"--jobs {args.jobs} is below 1", hint="pass --jobs 1 or more")
    names = ", ".join(str(s.name) for s in specs)
    con = Console(stderr=True) if args.json else out  # --json: stdout holds the JSON alone
    con.print(
        f"[bold]building {len(specs)} image(s), {args.jobs} at a time:[/bold] {names}",
        highlight=False,
    )
    done = 0

    def report(manifest: Manifest, built: bool) -> None:
        nonlocal done
        done += 1
        word = "built" if built else "up to date"
        con.print(
            f"({done}/{len(specs)}) {manifest.name}: {word}, disk "
            f"{manifest.disk.size >> 20} MiB, kernel {manifest.kernel_version}",
            highlight=False,
        )

    builder = Builder(args.image_path, args.cache_dir)
    results = builder.build_many(specs, force=args.force, jobs=args.jobs, on_done=report)
    if args.json:
        print(json.dumps([m.to_dict() for m, _ in results], indent=2))
    return 0


def _results_table(results: list[CheckResult]) -> Table:
    t = Table(title="image check")
    for col in ("image", "guest arch", "accel", "first answer", "uname", "result"):
        t.add_column(col)
    for r in results:
        t.add_row(
            r.name,
            r.machine,
            r.accel,
            f"{r.first_answer_s:.2f} s",
            f"{r.uname_s * 1000:.0f} ms",
            "ok" if r.ok else f"expected {r.expected}",
        )
    return t


def cmd_check(args: argparse.Namespace) -> int:
    if args.all:
        images, _ = scan(args.image_path)
        if not images:
            raise BadInput("no images to check", hint="build some with `tt image build`")
    elif args.names:
        images = [find(args.image_path, n) for n in args.names]
    else:
        raise BadInput("which image?", hint="tt image check qemu:debian-12:arm64, or --all")
    timeout = parse_duration_s(args.timeout, "--timeout")
    results: list[CheckResult] = []
    failures: list[str] = []
    for img in images:
        if not args.json:
            out.print(f"booting {img.name} ...", highlight=False)
        try:
            results.append(check_image(img, timeout=timeout))
        except TTError as e:
            failures.append(f"{img.name}: {e}")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        out.print(_results_table(results))
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 0 if not failures and all(r.ok for r in results) else 1


def cmd_list(args: argparse.Namespace) -> int:
    images, broken = scan(Path(args.image_path))
    warm = local_templates(Path(args.state_dir)) if getattr(args, "state_dir", None) else None
    if args.json:
        print(
            json.dumps(
                {
                    **({"warm": warm} if warm is not None else {}),
                    "images": [
                        {
                            "name": i.name,
                            "path": str(i.path),
                            "arch": i.manifest.arch,
                            "release": i.manifest.release,
                            "profile": i.manifest.profile,
                            "kernel": i.manifest.kernel_version,
                            "built_at": i.manifest.built_at,
                            "disk_bytes": i.manifest.disk.size,
                            "digest": i.manifest.digest,
                            "recipe_sha256": i.manifest.recipe_sha256,
                        }
                        for i in images
                    ],
                    "broken": [{"path": str(b.path), "reason": b.reason} for b in broken],
                },
                indent=2,
            )
        )
        return 0
    t = Table(title=f"images in {args.image_path}")
    for col in ("name", "suite", "kernel", "disk", "built"):
        t.add_column(col)
    for i in images:
        m = i.manifest
        t.add_row(m.name, m.suite, m.kernel_version, f"{m.disk.size >> 20} MiB", m.built_at)
    out.print(t)
    for b in broken:
        out.print(f"[red]broken[/red] {b.path}: {b.reason}", highlight=False)
    if warm is not None:
        out.print(_templates_table(warm))
        for t in warm["selftests"]:
            word = "[green]ok[/green]" if t["ok"] else "[red]FAILED: VMs boot cold[/red]"
            out.print(f"restore self-test {t['target']}: {word} ({t['detail']})", highlight=False)
    return 0


def _templates_table(warm: dict[str, Any]) -> Table:
    t = Table(title="snapshot templates (warm start)")
    for col in ("image", "size", "accel", "state", "disk", "hits", "made", "note"):
        t.add_column(col, overflow="fold")
    for r in warm["templates"]:
        t.add_row(
            r["image"],
            f"{r['vcpus']}x{r['memory_mib']}x{r['disk_gib']}",
            r["accel"],
            r["state"],
            f"{r['bytes'] >> 20} MiB",
            str(r["hits"]),
            r["created_at"],
            r["error"],
        )
    return t


def local_templates(state_dir: Path) -> dict[str, Any] | None:
    """The templates in hostd's state at state_dir (None when there is no hostd state)."""
    if not (state_dir / "hostd.db").exists():
        return None
    return Templates(open_store(state_dir), state_dir / "templates", "", None).report()


def parse_vm_size(text: str) -> tuple[float, int, int]:
    """CPUSxMIB[xGIB] (GiB 0: the image's size)."""
    parts = text.lower().split("x")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(text)
        return float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise BadInput(
            f"size {text!r} does not parse", hint="write CPUSxMIB[xGIB], e.g. 1x512"
        ) from None


def cmd_warm(args: argparse.Namespace) -> int:
    """Ask the local hostd to make templates (each request waits until its template is ready)."""
    images = [find(args.image_path, n) for n in args.names]
    sizes = [parse_vm_size(s) for s in args.size or ["1x512"]]
    failed = 0
    con = Console(stderr=True) if args.json else out  # --json: stdout holds the JSON alone
    made: list[dict[str, Any]] = []
    for img in images:
        for cpus, mem, disk in sizes:
            body: dict[str, Any] = {"image": img.name, "cpus": cpus, "memory_mib": mem}
            body["disk_gib"] = disk
            con.print(f"warming {img.name} {cpus:g}x{mem}x{disk or 'image'} ...", highlight=False)
            r = requests.post(
                f"http://{args.listen}/v1/templates",
                json=body,
                headers={"Authorization": f"Bearer {args.hostd_token}"},
                timeout=600,
            )
            if r.status_code == 201:
                row = r.json()
                made.append(row)
                con.print(f"  ready: template {row['id']} ({row['bytes'] >> 20} MiB)")
            else:
                failed += 1
                print(f"error: {img.name}: {r.status_code} {r.text.strip()[:500]}", file=sys.stderr)
    if args.json:
        print(json.dumps({"templates": made, "failed": failed}, indent=2))
    return 1 if failed else 0


def _list_pool_or_local(args: argparse.Namespace) -> int:
    return cmd_list(args) if args.local else cmd_list_pool(args)


def cmd_list_pool(args: argparse.Namespace) -> int:
    """`tt image list`: the pool's catalogue, as the scheduler aggregates it from its hosts."""
    images = Client(config.load()).get("/v1/images")
    if args.json:
        print(json.dumps(images, indent=2))
        return 0
    t = Table(title="images in the pool")
    for col in ("name", "os", "arch", "kernel", "hosts", "start"):
        t.add_column(col, overflow="fold")
    for i in images:
        what = (i.get(k, "") for k in ("release", "arch", "kernel"))  # a host may leave them out
        t.add_row(i["name"], *what, ", ".join(i["hosts"]), _start(i))
    out.print(t)
    return 0


def _start(image: dict[str, Any]) -> str:
    """warm, or cold and why (ttci.wire.warm.image_warmth, from the scheduler)."""
    w = image.get("warm") or {}
    if w.get("start") == "warm":
        cold = w.get("cold") or {}
        return "warm" + (f" (cold on {', '.join(sorted(cold))})" if cold else "")
    return f"cold: {w['why']}" if w.get("why") else "cold"


def cmd_prune(args: argparse.Namespace) -> int:
    say = (lambda _: None) if args.json else print  # --json: one document at the end
    removed = prune_cache(args.image_path, args.cache_dir)
    for tree in removed:
        say(f"removed {tree}")
    say(f"{len(removed)} cache tree(s) removed")
    partial = remove_partial(Path(args.image_path))
    for staged in partial:
        say(f"removed the partial pull {staged}")
    state_dir = Path(args.state_dir)
    gone: list[dict[str, Any]] = []
    volumes: list[str] = []
    if (state_dir / "hostd.db").exists():
        templates = Templates(open_store(state_dir), state_dir / "templates", "", None)
        gone = templates.collect(scan(args.image_path)[0])
        for row in gone:
            say(f"removed template {row['id']} of {row['image']} ({row['bytes'] >> 20} MiB)")
        say(f"{len(gone)} template(s) removed")
        volumes = prune_image_volumes(templates.volumes, scan(args.image_path)[0])
        say(f"{len(volumes)} image volume(s) removed ({templates.volumes.backend.describe()})")
    if args.json:
        shown = {"cache_trees": removed, "partial_pulls": partial, "templates": gone}
        shown["image_volumes"] = volumes
        print(json.dumps(shown, indent=2, default=str))
    return 0
