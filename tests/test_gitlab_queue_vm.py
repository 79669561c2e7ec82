"""GitLab jobs on a cloud with room for one VM, for real: the second of two jobs started together
waits in TT CI's queue (its job log says so) and both succeed; a job cancelled while queued
leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import json
import sys
from pathlib import Path

import pytest

from tests.cloudutil import small_cloud, tt
from tests.conftest import built_image
from tests.gitlab.harness import Job, JobResult, Runner
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.wire.envs import EnvRequest
from ttci.wire.queue import WaitOptions

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
DRIVER = str(Path(sys.executable).parent / "tt-gitlab-executor")
TARGET = {"TT_OS": "debian-12", "TT_ARCH": "amd64"}


def test_a_one_vm_cloud_queues_the_second_job_and_a_cancel_while_queued_leaves_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("glqueue")
    with small_cloud(state, cpu_total=1, mem_total=2048) as stack:
        cfg = state / "client.json"
        c = Client(ClientConfig(stack.scheduler, stack.token))
        runner = Runner(
            [DRIVER, "--memory", "384"], env={"TT_CONFIG": str(cfg)}, prepare_retry_delay=0
        )

        # Two jobs at once, room for one VM: one runs, the other waits its turn; both succeed.
        jobs = [Job(301, ["echo job-301; sleep 5"], variables=TARGET)]
        jobs.append(Job(302, ["echo job-302"], variables=TARGET))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(runner.run_job, j) for j in jobs]
            results: list[JobResult] = [f.result(timeout=600) for f in futures]
        for job, r in zip(jobs, results, strict=True):
            assert r.status == "success" and r.prepare_attempts == 1, r.text()
            assert f"\njob-{job.job_id}\n" in r.text()
        waited = [r for r in results if "waits in TT CI's queue" in r.text()]
        assert len(waited) == 1, [r.text() for r in results]
        log = waited[0].text()
        assert "TT CI: queued: position 1, waiting for capacity (needs 1 CPU" in log
        assert "TT CI: capacity granted after" in log and "ready in" in log
        assert "system failure" not in log

        # A job cancelled while it waits: its request leaves the queue, cleanup still succeeds.
        c.create_env(
            EnvRequest("blocker", "qemu:debian-12:amd64", memory_mib=384, life_s=900),
            wait=WaitOptions(wait=False),
        )
        r = runner.run_job(
            Job(303, ["echo never"], variables=TARGET), cancel_during="prepare", cancel_after_s=4
        )
        text = r.text()
        assert (r.status, r.prepare_attempts) == ("canceled", 1), text
        assert "queued: position 1" in text and "never" not in text.replace("echo never", "")
        assert "while it waited in TT CI's queue (position 1)" in text
        [prepare] = r.of("prepare")
        assert prepare.signals == ["cancel", "TERM"] and prepare.seconds < 15
        [cleanup] = r.of("cleanup")
        assert cleanup.rc == 0 and b"ENV gl-303 was already gone" in cleanup.stderr
        assert c.get("/v1/queue") == []
        assert [e["name"] for e in c.get("/v1/envs")] == ["blocker"]
        assert c.delete_env_wait("blocker")
        assert json.loads(tt("env", "list", "--json", config=cfg).stdout) == []
    # small_cloud checks that no VM, work dir, socket, cgroup or network is left
