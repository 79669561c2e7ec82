"""Warm start through the front-ends, on `tt up`'s real stack (one amd64 host, 384 MiB VMs).

Part of `python -m bench.warm --frontends`:
- GitLab: a one-stage job (`echo`) driven through `tt-gitlab-executor` as gitlab-runner drives
  it (tests/gitlab/harness.py: config, prepare, the runner's stages, cleanup, one process per
  call), warm and cold (the job variable TT_COLD=1) alternated; timed from prepare's start to
  the end of the first stage (its output is in the job log by then), and the whole job.
- GitHub: a `queued` workflow_job delivery to the real `tt-github-webhooks serve` (GitHub's API
  is the loopback stand-in built from its OpenAPI description) until run.sh started in the VM
  (bench/github.py's measurement), warm.
The template of that size is made first by one job of each kind (it boots cold and hostd makes
the template in the background); the runs start once hostd's state says it is ready.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, median
from bench.github import LABELS, REPO, SECRET, service, wait_job
from tests.github.payloads import deliver, job_event
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys
from tests.gitlab.harness import Job, Runner
from ttci.cli import allinone

__all__ = ["MEMORY_MIB", "frontends"]

MEMORY_MIB = 384
DRIVER = str(Path(sys.executable).parent / "tt-gitlab-executor")


def _template_ready(state: Path, timeout: float = 300) -> bool:
    """Until hostd's state has a ready template of MEMORY_MIB and none is being made."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(state / "hostd" / "hostd.db", timeout=5)) as db:
            ready, building = db.execute(
                "select sum(state = 'ready' and memory_mib = ?), sum(state = 'building') "
                "from templates",
                [MEMORY_MIB],
            ).fetchone()
        if ready and not building:
            return True
        time.sleep(1)
    return False


def _gitlab_job(runner: Runner, job_id: int, cold: bool) -> dict[str, Any]:
    variables = {"TT_OS": "debian-12", "TT_ARCH": "amd64", **({"TT_COLD": "1"} if cold else {})}
    t0 = time.monotonic()
    r = runner.run_job(Job(job_id, ["echo first-stage-output"], variables=variables))
    total = time.monotonic() - t0
    if r.status != "success" or "first-stage-output" not in r.text():
        raise RuntimeError(f"GitLab job {job_id} {r.status}: {r.text()[-2000:]}")
    prepare, first = r.of("prepare")[0], r.of("run")[0]
    return {
        "job": job_id,
        "cold": cold,
        "prepare_s": prepare.seconds,
        "first_stage_s": first.seconds,
        "to_first_output_s": prepare.seconds + first.seconds,
        "job_s": total,
    }


def _github_job(gh: StandIn, url: str, jid: int) -> dict[str, Any]:
    gh.add_job(REPO, jid, LABELS, "queued")
    t0 = time.time()
    deliver(url + "/webhook", job_event("queued", jid, LABELS, repo=REPO), SECRET.encode())
    job = wait_job(url, jid, lambda j: bool(j["runner_started_at"]))
    out = {
        "job": jid,
        "queued_to_run_sh_s": job["runner_started_at"] - t0,
        "vm_ready_s": job["vm_ready_at"] - t0,
        "guest_boot_s": float(job["guest_boot_s"] or 0),
    }
    gh.jobs[jid]["status"] = "completed"
    deliver(
        url + "/webhook",
        job_event("completed", jid, LABELS, repo=REPO, runner_name=job["runner_name"]),
        SECRET.encode(),
    )
    wait_job(url, jid, lambda j: j["state"] == "done")
    return out


def frontends(image_path: Path, runs: int) -> dict[str, Any]:
    """GitLab warm vs cold and GitHub warm, `runs` each; their runs and medians."""
    _, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    try:
        with tempfile.TemporaryDirectory(prefix="tt-bench-warm-fe-", dir="/var/tmp") as d:
            tmp = Path(d)
            runner_dir = tmp / "runner"
            runner_dir.mkdir()
            (runner_dir / "run.sh").write_bytes(RUN_SH.read_bytes())
            (runner_dir / "run.sh").chmod(0o755)
            with allinone.running(
                tmp / "cloud",
                image_path,
                scheduler_listen=f"127.0.0.1:{free_port()}",
                hostd_listen=f"127.0.0.1:{free_port()}",
                cpu_total=4,
                mem_total=4096,
            ) as stack:
                return _measure(gh, stack, tmp, runs)
    finally:
        gh.stop()


def _measure(gh: StandIn, stack: allinone.Stack, tmp: Path, runs: int) -> dict[str, Any]:
    runner = Runner(
        [DRIVER, "--memory", str(MEMORY_MIB)],
        env={"TT_SERVER": stack.scheduler, "TT_TOKEN": stack.token},
        prepare_retry_delay=0,
    )
    env = {"TT_SERVER": stack.scheduler, "TT_TOKEN": stack.token}
    extra = ["--push-runner", str(tmp / "runner"), "--mem", str(MEMORY_MIB)]
    with service(tmp, gh, [*extra, "--reconcile-interval", "3600"], env) as url:
        _gitlab_job(runner, 7_000_000, cold=False)  # boots cold; its template is made next
        if not _template_ready(stack.state_dir):
            raise RuntimeError("hostd made no template in 300 s: see its log")
        _github_job(gh, url, 7_100_000)  # the service's first job: its own warm-up
        _template_ready(stack.state_dir)
        gl: list[dict[str, Any]] = []
        for i in range(runs):
            for cold in (False, True):
                gl.append(_gitlab_job(runner, 7_000_001 + 2 * i + cold, cold))
        gh_runs = [_github_job(gh, url, 7_100_001 + i) for i in range(runs)]
    warm = [r["to_first_output_s"] for r in gl if not r["cold"]]
    cold = [r["to_first_output_s"] for r in gl if r["cold"]]
    return {
        "gitlab": gl,
        "gitlab_warm_s": median(warm),
        "gitlab_cold_s": median(cold),
        "gitlab_warm_job_s": median([r["job_s"] for r in gl if not r["cold"]]),
        "gitlab_cold_job_s": median([r["job_s"] for r in gl if r["cold"]]),
        "github": gh_runs,
        "github_warm_s": median([r["queued_to_run_sh_s"] for r in gh_runs]),
    }
