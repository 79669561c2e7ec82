"""ENV benchmark: `env add` -> first command output on every VM, and `env del`.

    python bench/env.py [--sizes 1,2,4] [--json out.json]

Runs the all-in-one cloud (scheduler + hostd + private libvirtd) and, for ENVs of 1, 2 and 4
amd64 VMs: the wall time from `env add` to the first output of a command on every VM, split
into the guests' own boot (kernel to agent, the slowest VM) and the host's overhead (everything
else: API, placement, overlays, libvirt, cgroups, the command's round trip). Then `env del`.
Targets: host overhead <= 1 s per ENV; `env del` of a 4-VM ENV <= 1 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, print_table, write_json
from hostd.builders.image_recipe import BuildSpec
from hostd.images.build import build_image
from ttci.cli import allinone
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging
from ttci.model.naming import parse_release, parse_target
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,2,4", help="ENV sizes to measure")
    p.add_argument("--image", default="debian-12:amd64", help="image prefix for the VMs")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    args = p.parse_args()
    setup_logging()
    t = parse_target(args.image)
    build_image(
        BuildSpec(parse_release(t.release), t.arch, profile=t.profile),
        args.image_path,
        args.cache_dir,
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, results = [], []
    with (
        tempfile.TemporaryDirectory(prefix="tt-bench-env-") as tmp,
        allinone.running(
            Path(tmp),
            args.image_path,
            scheduler_listen=f"127.0.0.1:{free_port()}",
            hostd_listen=f"127.0.0.1:{free_port()}",
            cpu_total=16,
            mem_total=8192,
        ) as stack,
    ):
        client = Client(ClientConfig(stack.scheduler, stack.token))
        for n in sizes:
            name = f"bench-{n}"
            t0 = time.monotonic()
            env = client.create_env(EnvRequest(name, args.image, dup_each=n, memory_mib=384))
            added = time.monotonic() - t0
            first: dict[str, float] = {}
            for ev in client.exec(name, ExecRequest.shell("echo ready")):
                if ev.kind is EventKind.STDOUT and ev.vm not in first:
                    first[ev.vm] = time.monotonic() - t0
            total = max(first.values())
            guest = max(v["guest_boot_s"] for v in env["vms"])
            overhead = total - guest
            t1 = time.monotonic()
            client.delete_env(name)
            deleted = time.monotonic() - t1
            assert len(first) == n, first
            results.append(
                {
                    "vms": n,
                    "add_s": added,
                    "first_output_all_s": total,
                    "guest_boot_max_s": guest,
                    "host_overhead_s": overhead,
                    "del_s": deleted,
                }
            )
            rows.append(
                [
                    str(n),
                    f"{total:.2f} s",
                    f"{guest:.2f} s",
                    f"{overhead:.2f} s",
                    "yes" if overhead <= 1 else "no",
                    f"{deleted:.2f} s",
                    "yes" if deleted <= 1 or n < 4 else "no",
                ]
            )
    print_table(
        "env add -> first output on every VM, and env del (targets: overhead <= 1 s, "
        "del of 4 VMs <= 1 s)",
        [
            "VMs",
            "to first output",
            "guest boot (max)",
            "host overhead",
            "<= 1 s",
            "env del",
            "del ok",
        ],
        rows,
    )
    write_json(args.json, {"image": args.image, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
