"""Exec benchmark: the agent against ssh into the same VM.

    python bench/exec.py [--runs 20] [--mb 100] [--json out.json]

One amd64 VM built with the `systemd` profile and sshd. In the same run: `true` round trip
through the agent, through a fresh `ssh` connection and through `ssh` with a ControlMaster;
and the throughput of 100 MB of stdout through the agent and through ssh.
Targets: >= 10x faster than fresh ssh, >= 1.2x faster than ControlMaster, >= 4x ssh's throughput.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    free_port,
    median,
    print_table,
    ssh_argv,
    ssh_image,
    wait_ssh,
    write_json,
)
from hostd.vm.direct_vm import boot
from ttci.infra.log import setup_logging


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        fn()  # type: ignore[operator]
        out.append(time.monotonic() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="round trips per path (median)")
    p.add_argument("--mb", type=int, default=100, help="MB of stdout for the throughput test")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    args = p.parse_args()
    setup_logging()
    image, key, accel = ssh_image(args.image_path, args.cache_dir)
    manifest = image.manifest
    port = free_port()
    nbytes = args.mb * 1_000_000
    with (
        boot(manifest, image.path, accel=accel, ssh_forward_port=port, memory_mib=1024) as vm,
        vm.connect(timeout=180) as agent,
        tempfile.TemporaryDirectory() as tmp,
    ):
        wait_ssh(key, port, timeout=180)
        # warm both paths once
        agent.output(["true"])
        subprocess.run([*ssh_argv(key, port), "true"], check=True, capture_output=True)

        agent_rt = timed(lambda: agent.output(["true"]), args.runs)
        fresh = timed(
            lambda: subprocess.run([*ssh_argv(key, port), "true"], check=True, capture_output=True),
            max(5, args.runs // 2),
        )
        ctl = Path(tmp) / "ctl"
        subprocess.run(
            [*ssh_argv(key, port, "-o", "ControlMaster=yes", "-o", f"ControlPath={ctl}", "-fN")],
            check=True,
        )
        cm = timed(
            lambda: subprocess.run(
                [*ssh_argv(key, port, "-o", f"ControlPath={ctl}"), "true"],
                check=True,
                capture_output=True,
            ),
            args.runs,
        )

        got = [0]

        def count(b: bytes) -> None:
            got[0] += len(b)

        t0 = time.monotonic()
        st = agent.exec(["head", "-c", str(nbytes), "/dev/zero"], on_stdout=count)
        agent_s = time.monotonic() - t0
        assert st.ok and got[0] == nbytes, (st, got)

        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*ssh_argv(key, port, "-o", f"ControlPath={ctl}"), f"head -c {nbytes} /dev/zero"],
            stdout=subprocess.PIPE,
        )
        n = 0
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 16):
            n += len(chunk)
        proc.wait()
        ssh_s = time.monotonic() - t0
        assert n == nbytes
        subprocess.run(
            [*ssh_argv(key, port, "-o", f"ControlPath={ctl}", "-O", "exit")],
            capture_output=True,
            check=False,
        )

    a, f, c = median(agent_rt), median(fresh), median(cm)
    a_mbs, s_mbs = nbytes / agent_s / 1e6, nbytes / ssh_s / 1e6
    print_table(
        f"exec on one {manifest.name} VM ({accel}): agent vs ssh",
        ["measure", "agent", "ssh", "ratio", "target", "met"],
        [
            [
                "`true` round trip vs fresh ssh",
                f"{a * 1000:.0f} ms",
                f"{f * 1000:.0f} ms",
                f"{f / a:.1f}x",
                ">= 10x",
                "yes" if f / a >= 10 else "no",
            ],
            [
                "`true` round trip vs ControlMaster",
                f"{a * 1000:.0f} ms",
                f"{c * 1000:.0f} ms",
                f"{c / a:.2f}x",
                ">= 1.2x",
                "yes" if c / a >= 1.2 else "no",
            ],
            [
                f"{args.mb} MB stdout",
                f"{a_mbs:.1f} MB/s",
                f"{s_mbs:.1f} MB/s",
                f"{a_mbs / s_mbs:.1f}x",
                ">= 4x",
                "yes" if a_mbs / s_mbs >= 4 else "no",
            ],
        ],
    )
    write_json(
        args.json,
        {
            "image": manifest.name,
            "accel": accel,
            "agent_true_s": agent_rt,
            "ssh_fresh_s": fresh,
            "ssh_controlmaster_s": cm,
            "agent_mb_s": a_mbs,
            "ssh_mb_s": s_mbs,
            "ratios": {
                "fresh_over_agent": f / a,
                "cm_over_agent": c / a,
                "throughput_agent_over_ssh": a_mbs / s_mbs,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
