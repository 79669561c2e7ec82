"""GitLab executor benchmark: our driver against ssh into the same VM, one run.

    python bench/gitlab.py [--runs 3] [--json out.json]

A job of 8 stages (the runner's kinds of generated bash: prepare_script, get_sources,
restore_cache, download_artifacts, build_script, after_script, archive_cache,
cleanup_file_variables), on `tt up`'s stack with the `debian-12+systemd:amd64` image that has
sshd and the benchmark key (bench/common.py).

1. The whole job through `tt-gitlab-executor` as gitlab-runner calls it (one process per call,
   the runner's environment and CUSTOM_ENV_* variables): config, prepare, 8 runs, cleanup.
   VM lifecycle overhead = config + prepare + cleanup minus the guest's own boot (hostd's
   `guest_boot_s`: VM started to agent answering; hostd's set-up before that counts as
   overhead). The job's total adds each run's overhead: its wall time minus the script's own
   time in the guest, which every script measures with bash's $EPOCHREALTIME.
2. Per stage, in the same VM (an ENV with port 22 mapped): the driver's `run SCRIPT STAGE`
   against `ssh VM /bin/bash < SCRIPT` over a fresh connection, which is how GitLab's documented
   libvirt custom-executor example runs every stage. Alternated stage by stage.
Targets: per-stage overhead >= 5x lower than ssh; executor overhead outside boot <= 1.5 s/job
(reported both ways: the VM lifecycle alone, and with the 8 stages' overhead added).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, median, print_table, ssh_argv, ssh_image, write_json
from runner_executor.core import job
from tests.gitlab.harness import Job, Runner, bash_script
from ttci.cli.allinone import running
from ttci.cli.ssh_exec import ssh_target
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging

DRIVER = str(Path(sys.executable).parent / "tt-gitlab-executor")
STAGES = [
    ("prepare_script", ['echo "Running on $(hostname)..."']),
    ("get_sources", ["mkdir -p /builds/group/project", "git --version"]),
    ("restore_cache", Runner._helper_lines("cache-extractor")),
    ("download_artifacts", Runner._helper_lines("artifacts-downloader")),
    ("build_script", ["uname -m", "echo build done"]),
    ("after_script", ['echo "after: $CI_JOB_STATUS"']),
    ("archive_cache", Runner._helper_lines("cache-archiver")),
    ("cleanup_file_variables", ["rm -rf /builds/group/project.tmp"]),
]
VARS = {"TT_OS": "debian-12", "TT_ARCH": "amd64", "TT_PROFILE": "systemd", "TT_MEMORY": "1024"}


def driver_env(job_id: int, tmp: Path, cfg: Path) -> dict[str, str]:
    """The environment gitlab-runner gives the driver (docs/facts/gitlab-custom-executor.md)."""
    j = Job(job_id, ["true"], variables=VARS)
    return {
        **os.environ,
        "TT_CONFIG": str(cfg),
        "TMPDIR": str(tmp),
        "BUILD_FAILURE_EXIT_CODE": "1",
        "SYSTEM_FAILURE_EXIT_CODE": "2",
        "BUILD_EXIT_CODE_FILE": str(tmp / "build_exit_code"),
        "JOB_RESPONSE_FILE": str(tmp / "response.json"),
        **{f"CUSTOM_ENV_{k}": v for k, v in j.all_variables("/builds").items()},
    }


GUEST_MARK = "tt-bench-guest"


def scripts(tmp: Path, job_id: int) -> list[tuple[str, Path]]:
    """The stage scripts, each timing itself in the guest with bash's $EPOCHREALTIME (a
    builtin: no extra process), so the script's own time is known for every call."""
    exports = Job(job_id, ["true"], variables=VARS).all_variables("/builds")
    out = []
    for i, (stage, lines) in enumerate(STAGES, 1):
        d = tmp / f"script{i:03d}"
        d.mkdir()
        p = d / "script"
        text = bash_script(lines, exports, None)
        head, _, body = text.partition("\n")
        body = body.replace(
            "\nexit 0\n", f'\necho "{GUEST_MARK} $__t0 $EPOCHREALTIME" >&2\nexit 0\n'
        )
        p.write_text(f"{head}\n__t0=$EPOCHREALTIME\n{body}")
        p.chmod(0o700)
        out.append((stage, p))
    return out


def call(argv: list[str], env: dict[str, str], stdin: Path | None = None) -> tuple[float, float]:
    """Run one driver (or ssh) call; returns (wall seconds, the script's seconds in the guest)."""
    t0 = time.monotonic()
    with open(stdin or os.devnull, "rb") as f:
        r = subprocess.run(argv, env=env, stdin=f, capture_output=True, check=False)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[-2:]} failed ({r.returncode}): {r.stderr.decode()[-800:]}")
    guest = 0.0
    for line in r.stderr.decode(errors="replace").splitlines():
        if line.startswith(GUEST_MARK):
            _, a, b = line.split()
            guest = float(b) - float(a)
    return took, guest


def full_job(job_id: int, cfg: Path, client: Client) -> dict[str, object]:
    """config, prepare, 8 stages, cleanup through the driver; boot time from the scheduler.

    Executor overhead = config + (prepare - the guest's boot) + each run minus the script's own
    time in the guest + cleanup.
    """
    with tempfile.TemporaryDirectory(prefix="custom-executor") as t:
        tmp = Path(t)
        env = driver_env(job_id, tmp, cfg)
        config_s = call([DRIVER, "config"], env)[0]
        prepare_s = call([DRIVER, "prepare"], env)[0]
        [vm] = client.show_env(f"gl-{job_id}")["vms"]
        stage_scripts = scripts(tmp, job_id)
        timed = [call([DRIVER, "run", str(p), stage], env) for stage, p in stage_scripts]
        runs, guest = [t[0] for t in timed], [t[1] for t in timed]
        cleanup_s = call([DRIVER, "cleanup"], env)[0]
    boot = float(vm.get("guest_boot_s") or vm["boot_s"])
    host_setup = float(vm["boot_s"]) - boot  # hostd: network, overlay, libvirt define, limits
    runs_over = sum(r - g for r, g in zip(runs, guest, strict=True))
    return {
        "config_s": config_s,
        "prepare_s": prepare_s,
        "boot_s": boot,
        "host_setup_s": host_setup,
        "prepare_rest_s": prepare_s - boot - host_setup,  # driver + scheduler
        "run_s": runs,
        "guest_s": guest,
        "cleanup_s": cleanup_s,
        "lifecycle_s": config_s + (prepare_s - boot) + cleanup_s,
        "overhead_s": config_s + (prepare_s - boot) + runs_over + cleanup_s,
    }


def same_vm(job_id: int, cfg: Path, client: Client, key: Path) -> dict[str, list[float]]:
    """Each stage through the driver and over a fresh ssh, alternating, in one VM."""
    req = job.env_request(
        {"CI_JOB_ID": str(job_id)}, "qemu:debian-12+systemd:amd64", job.Size(1, 1024, 0)
    )
    env_row = client.create_env(replace(req, vm_ports=((22, "tcp"),)))
    try:
        host, port = ssh_target(env_row["vms"][0])
        deadline = time.monotonic() + 180
        while True:
            r = subprocess.run(
                [*ssh_argv(key, port), "true"], capture_output=True, timeout=30, check=False
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ssh to {host}:{port} did not answer")
            time.sleep(0.3)
        out: dict[str, list[float]] = {"driver": [], "ssh": [], "guest_d": [], "guest_s": []}
        with tempfile.TemporaryDirectory(prefix="custom-executor") as t:
            tmp = Path(t)
            env = driver_env(job_id, tmp, cfg)
            ssh = [*ssh_argv(key, port), "/bin/bash"]
            assert host in ("127.0.0.1", "localhost"), host
            for stage, p in scripts(tmp, job_id):
                wall, guest = call([DRIVER, "run", str(p), stage], env)
                out["driver"].append(wall)
                out["guest_d"].append(guest)
                wall, guest = call(ssh, env, stdin=p)
                out["ssh"].append(wall)
                out["guest_s"].append(guest)
        return out
    finally:
        client.delete_env(f"gl-{job_id}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="jobs of each kind (medians reported)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    args = p.parse_args()
    setup_logging()
    image, key, _ = ssh_image(args.image_path, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="tt-bench-gitlab-") as state:
        cfg = Path(state) / "client.json"
        with running(
            Path(state) / "cloud",
            args.image_path,
            scheduler_listen=f"127.0.0.1:{free_port()}",
            hostd_listen=f"127.0.0.1:{free_port()}",
            cpu_total=4,
            mem_total=4096,
        ) as stack:
            os.environ["TT_CONFIG"] = str(cfg)
            from ttci.client import config

            config.save(stack.scheduler, stack.token)
            client = Client(ClientConfig(stack.scheduler, stack.token))
            jobs = [full_job(9100 + i, cfg, client) for i in range(args.runs)]
            pairs = [same_vm(9200 + i, cfg, client, key) for i in range(args.runs)]
    drv = [x for pr in pairs for x in pr["driver"]]
    ssh = [x for pr in pairs for x in pr["ssh"]]
    g_d = [x for pr in pairs for x in pr["guest_d"]]
    g_s = [x for pr in pairs for x in pr["guest_s"]]
    d, s, g = median(drv), median(ssh), median(g_d + g_s)
    # Overhead per stage: the call's wall time minus what the script itself took in the guest.
    d_ov = median([a - b for a, b in zip(drv, g_d, strict=True)])
    s_ov = median([a - b for a, b in zip(ssh, g_s, strict=True)])
    overhead = median([float(j["overhead_s"]) for j in jobs])  # type: ignore[arg-type]
    lifecycle = median([float(j["lifecycle_s"]) for j in jobs])  # type: ignore[arg-type]
    rows = [
        [
            "per-stage overhead (same VM)",
            f"{d_ov * 1000:.0f} ms",
            f"{s_ov * 1000:.0f} ms",
            f"{s_ov / d_ov:.1f}x",
            ">= 5x",
            "yes" if s_ov / d_ov >= 5 else "no",
        ],
        [
            "per-stage wall time",
            f"{d * 1000:.0f} ms",
            f"{s * 1000:.0f} ms",
            f"{s / d:.1f}x",
            "",
            "",
        ],
        ["  of which the script in the guest", f"{g * 1000:.0f} ms", "", "", "", ""],
        [
            "8-stage job: 8 runs",
            f"{sum(drv) / len(pairs):.2f} s",
            f"{sum(ssh) / len(pairs):.2f} s",
            f"{sum(ssh) / sum(drv):.1f}x",
            "",
            "",
        ],
        [
            "executor overhead outside boot: VM lifecycle",
            f"{lifecycle:.2f} s",
            "",
            "",
            "<= 1.5 s",
            "yes" if lifecycle <= 1.5 else "no",
        ],
        [
            "  ... plus the 8 stages' overhead",
            f"{overhead:.2f} s",
            "",
            "",
            "<= 1.5 s",
            "yes" if overhead <= 1.5 else "no",
        ],
    ]
    for name in ("config_s", "prepare_rest_s", "host_setup_s", "cleanup_s", "boot_s"):
        v = median([float(j[name]) for j in jobs])  # type: ignore[arg-type]
        rows.append([f"  job {name[:-2]} (median)", f"{v:.2f} s", "", "", "", ""])
    print_table(
        f"GitLab job on {image.manifest.name}: tt-gitlab-executor vs ssh (GitLab's libvirt way)",
        ["measure", "driver", "ssh", "ratio", "target", "met"],
        rows,
    )
    write_json(
        args.json,
        {
            "image": image.manifest.name,
            "stages": [s for s, _ in STAGES],
            "jobs": jobs,
            "same_vm": pairs,
            "ratios": {
                "ssh_over_driver_stage_overhead": s_ov / d_ov,
                "ssh_over_driver_stage_wall": s / d,
            },
            "stage_overhead_s": {"driver": d_ov, "ssh": s_ov},
            "executor_overhead_s": {"lifecycle": lifecycle, "with_stages": overhead},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
