"""Every front-end at once on one small cloud, for real (issue 12): room for two 1-CPU VMs, and
at the same time two GitLab jobs through the runner-faithful harness and `tt-gitlab-executor`,
a GitHub burst of three jobs through `tt-github-webhooks serve` and the stand-in GitHub, and one
`tt job run`. Six VMs' worth of work on two VMs' room: they all wait their turn in TT CI's
admission queue, all complete, none fails or is retried, GitHub is asked for exactly one JIT
runner config per job, and afterwards no ENV, VM or queue entry is left."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cloudutil import BIN, leftovers, small_cloud
from tests.conftest import built_image
from tests.github.e2e import GitHubSide, github_service
from tests.gitlab.harness import Job, JobResult, Runner
from ttci.client.config import ClientConfig
from ttci.client.scheduler import ApiError, Client

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
DRIVER = str(BIN / "tt-gitlab-executor")
TARGET = {"TT_OS": "debian-12", "TT_ARCH": "amd64"}
GITHUB_JOBS = [(85000, "octo-org/big"), (85001, "octo-org/big"), (85100, "small-org/app")]
GITLAB_JOBS = [Job(501, ["echo gitlab-501"], variables=TARGET)]
GITLAB_JOBS.append(Job(502, ["echo gitlab-502"], variables=TARGET))


def _job_run(cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`tt job run` as Jenkins runs it (without Jenkins' variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JENKINS_", "BUILD_"))}
    return subprocess.run(
        [BIN / "tt", "job", "run", *("--os", "debian-12", "--arch", "amd64", "--mem", "384"),
         "--no-copy", "--", "echo from-tt-job-run"],
        cwd=cwd, capture_output=True, text=True, env={**env, "TT_CONFIG": str(cfg)}, timeout=600,
    )  # fmt: skip


def _watch_queue(c: Client, stop: threading.Event, seen: list[dict[str, Any]]) -> None:
    """Every entry TT CI's queue showed while the jobs ran (what waited, and why)."""
    while not stop.is_set():
        with contextlib.suppress(ApiError, requests.RequestException):  # a busy moment's hiccup
            seen += c.get("/v1/queue")
        stop.wait(0.3)


def test_gitlab_github_and_tt_job_run_share_a_two_vm_cloud_and_all_complete(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("mixedq")
    work = state / "work"
    work.mkdir()
    t0 = time.monotonic()
    with (
        small_cloud(state, cpu_total=2, mem_total=2048) as stack,
        github_service(state / "github", stack.scheduler, stack.token) as side,
    ):
        cfg = state / "client.json"
        c = Client(ClientConfig(stack.scheduler, stack.token))
        runner = Runner(
            [DRIVER, "--memory", "384"], env={"TT_CONFIG": str(cfg)}, prepare_retry_delay=0
        )
        seen: list[dict[str, Any]] = []
        stop = threading.Event()
        watch = Client(ClientConfig(stack.scheduler, stack.token))  # a session of its own
        watcher = threading.Thread(target=_watch_queue, args=(watch, stop, seen), daemon=True)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                github = pool.submit(GitHubSide.run_burst, side, GITHUB_JOBS, 400)
                gitlab = [pool.submit(runner.run_job, j) for j in GITLAB_JOBS]
                job_run = pool.submit(_job_run, cfg, work)
                # run_burst asserts: every job done, none failed or retried, exactly one
                # generate-jitconfig per job, no runner left registered at GitHub.
                rows = github.result(timeout=450)
                results: list[JobResult] = [f.result(timeout=450) for f in gitlab]
                jr = job_run.result(timeout=450)
        finally:
            stop.set()
            watcher.join(timeout=10)
            watch.session.close()
        elapsed = time.monotonic() - t0

        for job, r in zip(GITLAB_JOBS, results, strict=True):
            text = r.text()
            assert (r.status, r.prepare_attempts) == ("success", 1), text
            assert f"\ngitlab-{job.job_id}\n" in text and "system failure" not in text
        assert jr.returncode == 0, jr.stderr
        assert jr.stdout == "from-tt-job-run\n", (jr.stdout, jr.stderr)
        assert all(row["conclusion"] == "success" for row in rows.values()), rows
        jit = side.jit_calls()
        assert jit == {f"tt-{jid}-1": 1 for jid, _ in GITHUB_JOBS}, jit  # and no one else's

        # Six VMs' worth of jobs on room for two: some waited in the queue, and every front-end
        # that waited did so as itself.
        assert seen, "nothing ever waited in TT CI's queue"
        kinds = {q["kind"] for q in seen}
        print(f"all done in {elapsed:.0f} s; kinds seen waiting: {sorted(kinds)}")
        history = {j["env"]: j["result"] for j in c.get("/v1/jobs", limit=100) if j.get("env")}
        for jid, _ in GITHUB_JOBS:
            assert history.get(f"gh-{jid}-1") == "success", history
        for job in GITLAB_JOBS:
            assert history.get(f"gl-{job.job_id}") == "success", history

        side.wait("no ENV left", lambda: c.get("/v1/envs") == [], timeout=60)
        assert c.get("/v1/queue") == []
        assert leftovers(stack.state_dir) == []  # no VM, work dir, cgroup or state row
        c.session.close()
    # small_cloud checks again once the cloud has stopped; github_service that the service
    # stopped on SIGTERM and logged no secret
