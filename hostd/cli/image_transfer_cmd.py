"""`tt image pull` and `tt image push`: images travel between the hosts of a pool.

pull (on a host, into its --image-path): fetch an image the pool has through the scheduler (the
client config's admin token), or from a directory laid out like an image path (--from-dir), with
every byte verified before the image is offered; a cut pull resumes when run again. The running
hostd offers it at once (its catalogue is scanned on every call) and reports it with its next
heartbeat. push (an admin, anywhere): ask hosts that lack an image to fetch it now.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from hostd.images.catalogue import find
from hostd.images.sources import DirSource, HttpSource, Source
from hostd.images.transfer import Progress as Step
from hostd.images.transfer import pull
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.infra.settings import add_setting
from ttci.model.errors import BadInput
from ttci.model.naming import select_by_prefix

__all__ = ["cmd_pull", "cmd_push", "register_transfer"]

err = Console(stderr=True)


def register_transfer(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = isub.add_parser(
        "pull",
        help="fetch an image the pool has into this host's --image-path (verified, resumable)",
    )
    p.add_argument("name", help="image name or a prefix that selects one (see tt image list)")
    p.add_argument(
        "--from-dir",
        metavar="PATH",
        help="take it from a directory laid out like an image path instead of the pool",
    )
    p.add_argument(
        "--rate", type=float, default=0, metavar="MIB_S", help="cap the transfer (MiB/s)"
    )
    p.add_argument("--replace", action="store_true", help="replace another build of it here")
    p.add_argument("--json", action="store_true", help="print the result as JSON (only that)")
    add_setting(p, "image-path")
    p.set_defaults(func=cmd_pull)

    s = isub.add_parser("push", help="ask the pool's hosts that lack an image to fetch it now")
    s.add_argument("name", help="image name or a prefix that selects one")
    s.add_argument(
        "--host", action="append", default=[], help="only these hosts (default: all lacking it)"
    )
    s.add_argument("--wait", action="store_true", help="wait until each has it (up to 30 min)")
    s.add_argument("--json", action="store_true", help="print what each host said as JSON")
    s.set_defaults(func=cmd_push)


def _pool_image(client: Client, name: str) -> dict[str, Any]:
    images = {i["name"]: i for i in client.get("/v1/images")}
    chosen = [name.lower()] if name.lower() in images else select_by_prefix(images, name)
    if len(chosen) != 1:
        raise BadInput(
            f"{name!r} selects {len(chosen)} of the pool's images"
            + (f": {', '.join(chosen)}" if chosen else ""),
            hint="give one image's full name (tt image list)",
        )
    return dict(images[chosen[0]])


def _source(args: argparse.Namespace) -> tuple[Source, str, str]:
    """(source, image name, digest to pin)."""
    if args.from_dir:
        source = DirSource(Path(args.from_dir))
        img = find(source.path, args.name)
        return source, img.name, img.manifest.digest
    cfg = config.load()
    image = _pool_image(Client(cfg), args.name)
    headers = {"Authorization": f"Bearer {cfg.token}"}
    http = HttpSource(cfg.url, headers, verify=str(cfg.ca) if cfg.ca else True)
    http.where = f"the pool (scheduler {cfg.server})"
    return http, str(image["name"]), str(image.get("digest") or "")


def cmd_pull(args: argparse.Namespace) -> int:
    if args.rate < 0:
        raise BadInput(f"--rate {args.rate} is negative", hint="MiB/s; 0 means no cap")
    source, name, digest = _source(args)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(f"pulling {name}", total=None)
        last = [0.0]

        def show(p: Step) -> None:
            bar.update(task, completed=p.done, total=p.total, description=f"{name}: {p.file}")
            if not err.is_terminal and time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                print(
                    f"{name}: {p.file} {p.done >> 20}/{p.total >> 20} MiB "
                    f"({p.rate / (1 << 20):.1f} MiB/s)",
                    file=sys.stderr,
                    flush=True,
                )

        result = pull(
            args.image_path,
            name,
            source,
            digest=digest,
            rate=args.rate * (1 << 20),
            on_progress=show,
            replace=args.replace,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.already:
        print(f"{name}: already here ({result.path})")
    else:
        d = result.to_dict()
        print(
            f"{name}: pulled from {source.where} and verified in {d['seconds']:.1f} s: "
            f"{result.fetched >> 20} MiB received ({d['rate_mib_s']} MiB/s), "
            f"{result.reused >> 20} MiB reused from local images, {result.resumed >> 20} MiB "
            f"resumed; in {result.path}"
        )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    client = Client(config.load())
    name = str(_pool_image(client, args.name)["name"])
    answers = client.call_json("POST", f"/v1/images/{name}/distribute", json={"hosts": args.host})
    queued = [a["host"] for a in answers if a.get("queued")]
    if args.wait and queued:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            have = set(_pool_image(client, name).get("hosts", []))
            if set(queued) <= have:
                break
            time.sleep(3)
        else:
            answers.append({"error": "timed out waiting for the hosts to report it"})
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        if not answers:
            print(f"{name}: every host that is up has it already")
        for a in answers:
            if a.get("queued"):
                print(f"{a['host']}: fetching {name}" + (" (done)" if args.wait else ""))
            else:
                print(f"{a.get('host', name)}: {a.get('error')}", file=sys.stderr)
    return 0 if all(a.get("queued") for a in answers) else 1
