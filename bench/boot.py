"""Boot benchmark: time to first agent answer per image, against ssh into a systemd guest.

    python bench/boot.py [--runs 3] [--json out.json] [--build]

For every default image: median time from starting QEMU to the agent's first answer. In the same
run, the amd64 image built with the `systemd` profile and sshd: time until `ssh true` works (how
GitLab's documented libvirt executor waits for its VMs), and until its agent answers. With
--build, the nine images are first rebuilt from an empty cache and the build times reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, median, print_table, ssh_image, wait_ssh, write_json
from hostd.builders.image_recipe import DEFAULT_TARGETS, BuildSpec
from hostd.images.build import Builder
from hostd.images.catalogue import Image
from hostd.vm.accel import choose_accel
from hostd.vm.direct_vm import boot
from ttci.infra.log import setup_logging
from ttci.model.naming import parse_release


def agent_boot(image: Image, accel: str) -> float:
    with boot(image.manifest, image.path, accel=accel) as vm, vm.connect(timeout=120) as agent:
        first = time.monotonic() - vm.started
        status, _, _ = agent.output(["true"])
        assert status.ok
        return first


def main() -> int:  # noqa: PLR0915 - argparse, the runs and the table in order
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="boots per image (median reported)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    p.add_argument("--build", action="store_true", help="rebuild all images from an empty cache")
    p.add_argument("--only", action="append", help="only these arches (e.g. amd64)")
    args = p.parse_args()
    setup_logging()
    # SIGTERM unwinds like Ctrl-C, so a stopped benchmark leaves no half build or mount behind
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    targets = [(r, a) for r, a in DEFAULT_TARGETS if not args.only or a.value in args.only]

    build_rows, build_times = [], {}
    image_path, cache_dir = args.image_path, args.cache_dir
    if args.build:
        tmp = Path(tempfile.mkdtemp(prefix="tt-bench-build-", dir="/var/tmp"))
        image_path, cache_dir = tmp / "images", tmp / "cache"
    total0 = time.monotonic()
    builder = Builder(image_path, cache_dir)
    specs = [BuildSpec(parse_release(r), a) for r, a in targets]
    built = builder.build_many(specs, jobs=os.cpu_count() or 1)
    total_build = time.monotonic() - total0
    images = [Image(m, image_path / m.image_name.dirname) for m, _ in built]
    for spec in specs:
        took = builder.durations[str(spec.name)]
        build_times[str(spec.name)] = took
        build_rows.append(
            [
                str(spec.name),
                f"{took:.0f} s",
                "native" if spec.arch.is_native() else "foreign (qemu-user)",
            ]
        )

    rows, results = [], []
    amd64_agent = None
    for image in images:
        accel, _ = choose_accel(image)
        times = [agent_boot(image, accel) for _ in range(args.runs)]
        med = median(times)
        if image.name == "qemu:debian-12:amd64":
            amd64_agent = med
        results.append(
            {"image": image.name, "accel": accel, "agent_first_answer_s": times, "median_s": med}
        )
        rows.append(
            [
                image.name,
                accel,
                f"{med:.2f} s",
                " ".join(f"{t:.2f}" for t in times),
                "yes" if med <= 4.0 else "no",
            ]
        )
    print_table(
        "time to first agent answer (target <= 4 s)",
        ["image", "accel", "median", "runs", "<= 4 s"],
        rows,
    )

    # The ssh baseline: the same Debian on amd64, booted with systemd and sshd.
    sd_image, key, accel = ssh_image(args.image_path, args.cache_dir)
    sd_manifest = sd_image.manifest
    ssh_runs = []
    for _ in range(args.runs):
        port = free_port()
        with boot(sd_manifest, sd_image.path, accel=accel, ssh_forward_port=port) as vm:
            wait_ssh(key, port, timeout=180)
            ssh_runs.append(time.monotonic() - vm.started)
    ssh_med = median(ssh_runs)
    ratio = ssh_med / amd64_agent if amd64_agent else float("nan")
    print_table(
        "amd64: agent (default profile) vs ssh into a systemd guest (target >= 3x)",
        ["path", "median", "runs"],
        [
            ["agent, default profile", f"{amd64_agent or float('nan'):.2f} s", ""],
            [
                "ssh true, systemd + sshd",
                f"{ssh_med:.2f} s",
                " ".join(f"{t:.2f}" for t in ssh_runs),
            ],
            ["ratio ssh / agent", f"{ratio:.1f}x", "yes" if ratio >= 3 else "no"],
        ],
    )
    if args.build:
        foreign = [
            t for (r, a), t in zip(targets, build_times.values(), strict=True) if not a.is_native()
        ]
        build_rows.append(["all images", f"{total_build:.0f} s", "target <= 900 s"])
        build_rows.append(
            ["slowest foreign build", f"{max(foreign, default=0):.0f} s", "target <= 120 s"]
        )
        print_table("image builds from an empty cache", ["image", "time", "note"], build_rows)
    if args.build:
        shutil.rmtree(image_path.parent, ignore_errors=True)
    write_json(
        args.json,
        {
            "boot": results,
            "ssh_runs_s": ssh_runs,
            "ssh_median_s": ssh_med,
            "agent_amd64_median_s": amd64_agent,
            "ssh_over_agent": ratio,
            "build_s": build_times if args.build else None,
            "build_total_s": total_build if args.build else None,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
