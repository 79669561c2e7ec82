"""End to end, for real: `tt up`'s stack boots real VMs, `tt-github-webhooks serve` runs as a
subprocess as an operator starts it, GitHub is the OpenAPI stand-in (driven by PyGithub inside
the service), deliveries are GitHub's payloads signed as GitHub signs them. The actions runner
is in no registry here, so the service pushes the stand-in run.sh into each VM (--push-runner)
and the test checks the runner it started carries the JIT config GitHub issued for that job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cloudutil import configure_client, free_port, leftovers
from tests.conftest import IMAGE_PATH, built_image
from tests.github.payloads import deliver, job_event
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys, serve_argv
from ttci.cli.allinone import running
from ttci.client.config import ClientConfig
from ttci.client.scheduler import ApiError, Client
from ttci.infra.proc import stop
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
SECRET = "e2e-webhook-secret-7c1d"
REPO = "octo-org/hello"
AMD64 = ["self-hosted", "tt", "debian-12", "amd64"]


@dataclass
class World:
    url: str  # the webhook service
    gh: StandIn
    tt: Client
    log: Path
    state: Path
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.proc = self.start()

    def stop(self) -> float:
        """SIGTERM the service as an operator's init system does; seconds until it exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        code = stop(self.proc, grace=30)
        assert code != -signal.SIGKILL, "the service ignored SIGTERM for 30 s"
        return time.monotonic() - t0

    def restart(self) -> float:
        took = self.stop()
        self.proc = self.start()
        self.wait("the service", lambda: _up(self.url), timeout=30)
        return took

    def send(self, payload: dict[str, Any]) -> requests.Response:
        return deliver(self.url + "/webhook", payload, SECRET.encode())

    def jobs(self) -> dict[int, dict[str, Any]]:
        return {j["id"]: j for j in requests.get(self.url + "/jobs", timeout=5).json()}

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; jobs: {self.jobs()}; "
                    f"log tail: {self.log.read_text()[-3000:]}"
                )
            time.sleep(0.2)

    def in_vm(self, env: str, cmd: str) -> str:
        out = []
        for ev in self.tt.exec(env, ExecRequest.shell(cmd)):
            if ev.kind is EventKind.STDOUT:
                out.append(ev.data.decode())
        return "".join(out)

    def env_exists(self, env: str) -> bool:
        try:
            self.tt.show_env(env)
        except ApiError as e:
            assert e.status == 404
            return False
        return True


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("ghcloud")
    private, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    key = state / "app.pem"
    key.write_text(private)
    runner = state / "runner"
    runner.mkdir()
    (runner / "run.sh").write_bytes(RUN_SH.read_bytes())
    (runner / "run.sh").chmod(0o755)
    cfg = state / "client.json"
    with running(
        state,
        IMAGE_PATH,
        scheduler_listen=f"127.0.0.1:{free_port()}",
        hostd_listen=f"127.0.0.1:{free_port()}",
        cpu_total=4,
        mem_total=3072,
    ) as stack:
        configure_client(stack.scheduler, stack.token, cfg)
        port = free_port()
        log = state / "webhooks.log"
        env = {**os.environ, "TT_CONFIG": str(cfg), "TT_GH_WEBHOOK_SECRET": SECRET}
        argv = serve_argv(
            state / "gh",
            gh.url,
            key,
            port,
            "--push-runner",
            str(runner),
            "--mem",
            "384",
            "--reconcile-interval",
            "2",
            "--runner-timeout",
            "120",
            "--repo",
            REPO,
        )

        def start() -> subprocess.Popen[bytes]:
            with log.open("ab") as logf:
                return subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)

        url = f"http://127.0.0.1:{port}"
        tt = Client(ClientConfig(stack.scheduler, stack.token))
        w = World(url, gh, tt, log, state, start)
        try:
            w.wait("the service", lambda: _up(url), timeout=30)
            yield w
        finally:
            w.stop()
            leftover_envs = [e["name"] for e in tt.get("/v1/envs")]
            tt.session.close()
            gh.stop()
        assert leftover_envs == []
    assert leftovers(state) == []
    text = log.read_text()  # no secret reached the service's log
    assert SECRET not in text
    assert not any(jit in text for jit in gh.issued.values())
    assert not any(tok in text for tok in gh.tokens)


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_queued_job_gets_a_fresh_vm_with_its_own_jit_runner(world: World) -> None:
    jid = 81000001
    world.gh.add_job(REPO, jid, AMD64, "queued")
    t0 = time.monotonic()
    r = world.send(job_event("queued", jid, AMD64, repo=REPO))
    assert r.status_code == 202 and time.monotonic() - t0 < 1  # slow work is off the path
    world.wait("the runner to start", lambda: world.jobs()[jid]["state"] == "started")
    job = world.jobs()[jid]
    env, runner = job["env"], job["runner_name"]
    assert (env, runner) == (f"gh-{jid}-1", f"tt-{jid}-1")  # the job id names both
    shown = world.tt.show_env(env)
    assert shown["origin"] == {
        "kind": "github",
        "job": str(jid),
        "project": REPO,
        "url": f"https://github.com/{REPO}/actions/runs/"
        f"{job_event('queued', jid, AMD64)['workflow_job']['run_id']}"
        f"/job/{jid}",
        "runner": runner,
    }
    assert [v["image"] for v in shown["vms"]] == ["qemu:debian-12:amd64"]
    # run.sh got the JIT config GitHub issued for this very runner, through its environment
    record = dict(
        line.split("=", 1) for line in world.in_vm(env, "cat /tmp/tt-runner-record").splitlines()
    )
    assert record["env_jit"] == world.gh.issued[runner]
    assert record["argv"] == "" and record["pwd"] == "/opt/actions-runner"
    # ... and no process in the VM shows it on its command line
    procs = world.in_vm(env, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert "run.sh" in procs and world.gh.issued[runner] not in procs
    # GitHub's view: the runner is registered with the job's labels
    assert [lb["name"] for lb in world.gh.runners[REPO][runner]["labels"]] == AMD64

    world.gh.jobs[jid]["status"] = "in_progress"
    world.send(job_event("in_progress", jid, AMD64, repo=REPO, runner_name=runner))
    world.wait("in_progress", lambda: world.jobs()[jid]["took_runner"] == runner)
    world.gh.jobs[jid]["status"] = "completed"
    world.send(
        job_event("completed", jid, AMD64, repo=REPO, runner_name=runner, conclusion="success")
    )
    world.wait("the VM to go", lambda: world.jobs()[jid]["state"] == "done", timeout=60)
    assert not world.env_exists(env)
    assert runner not in world.gh.runners.get(REPO, {})  # deregistered: no stale runner
    history = [j for j in world.tt.get("/v1/jobs") if j.get("env") == env]
    assert [j["result"] for j in history] == ["success"]  # GitHub's conclusion, recorded


def test_missed_webhook_is_adopted_and_a_runner_exiting_ends_its_vm(world: World) -> None:
    jid = 81000002
    world.gh.add_job(REPO, jid, AMD64, "queued")  # GitHub queued it; no delivery reaches us
    world.wait(
        "the reconciler to start a runner",
        lambda: world.jobs().get(jid, {}).get("state") == "started",
    )
    env = world.jobs()[jid]["env"]
    assert world.env_exists(env)
    world.gh.jobs[jid]["status"] = "in_progress"
    world.in_vm(env, "echo 0 > /tmp/tt-runner-exit")  # the runner ends on its own
    world.wait("the VM to go", lambda: world.jobs()[jid]["state"] == "done", timeout=60)
    assert not world.env_exists(env)
    assert "the runner exited (0)" in world.jobs()[jid]["reason"]


def test_target_without_an_image_is_unservable_and_says_why(world: World) -> None:
    jid = 81000003
    labels = ["self-hosted", "tt", "debian-13", "s390x"]  # no such image in this cloud
    world.gh.add_job(REPO, jid, labels, "queued")
    world.send(job_event("queued", jid, labels, repo=REPO))
    world.wait("the verdict", lambda: world.jobs()[jid]["state"] == "unservable", timeout=60)
    reason = world.jobs()[jid]["reason"]
    assert "no image matches" in reason and "qemu:debian-12:amd64" in reason
    assert not world.env_exists(f"gh-{jid}-1")
    assert f"tt-{jid}-1" not in world.gh.runners.get(REPO, {})
    assert json.dumps(world.jobs()[jid])  # plain data for the operator


def test_rate_limited_jit_config_puts_the_job_back_and_no_vm_stays(world: World) -> None:
    jid = 81000004
    world.gh.add_job(REPO, jid, AMD64, "queued")
    world.gh.fail(
        "actions/generate-runner-jitconfig-for-repo",
        429,
        headers={"Retry-After": "90"},
        message="API rate limit exceeded",
    )
    world.send(job_event("queued", jid, AMD64, repo=REPO))
    world.wait(
        "the job to be put back",
        lambda: world.jobs()[jid]["attempt"] == 1 and world.jobs()[jid]["state"] == "pending",
    )
    reason = world.jobs()[jid]["reason"]
    assert "rate-limited" in reason and "90 s" in reason
    assert not world.env_exists(f"gh-{jid}-1")  # the VM booted meanwhile is gone again
    # GitHub cancels the job while it waits: nothing of ours is left
    world.gh.jobs[jid]["status"] = "completed"
    world.send(job_event("completed", jid, AMD64, repo=REPO, conclusion="cancelled"))
    world.wait("done", lambda: world.jobs()[jid]["state"] == "done", timeout=30)


def test_job_finished_on_github_without_a_webhook_loses_its_vm(world: World) -> None:
    jid = 81000005
    world.gh.add_job(REPO, jid, AMD64, "queued")
    world.send(job_event("queued", jid, AMD64, repo=REPO))
    world.wait("the runner to start", lambda: world.jobs()[jid]["state"] == "started")
    env = world.jobs()[jid]["env"]
    world.gh.jobs[jid]["status"] = "completed"  # the in_progress/completed deliveries are lost
    world.wait("the reconciler", lambda: world.jobs()[jid]["state"] == "done", timeout=60)
    assert not world.env_exists(env)
    assert f"tt-{jid}-1" not in world.gh.runners.get(REPO, {})


def test_restart_keeps_running_jobs_and_the_reconciler_ends_them(world: World) -> None:
    jid = 81000006
    world.gh.add_job(REPO, jid, AMD64, "queued")
    world.send(job_event("queued", jid, AMD64, repo=REPO))
    world.wait("the runner to start", lambda: world.jobs()[jid]["state"] == "started")
    env = world.jobs()[jid]["env"]
    # stopping does not wait for running jobs (a provisioning thread lives as long as its runner)
    assert world.restart() < 10
    assert world.env_exists(env) and world.jobs()[jid]["state"] == "started"
    world.gh.jobs[jid]["status"] = "completed"  # it ran while we were away
    world.wait("the reconciler", lambda: world.jobs()[jid]["state"] == "done", timeout=60)
    assert not world.env_exists(env)


def test_reconciler_deletes_our_orphan_envs_only(world: World) -> None:
    user_env = EnvRequest("gh-99-1", "debian-12:amd64", memory_mib=384, life_s=600)
    world.tt.create_env(user_env)  # a user's own ENV with a lookalike name
    orphan = {"kind": "github", "job": "98", "project": REPO, "runner": "tt-98-1"}
    world.tt.create_env(replace(user_env, name="gh-98-1", origin=orphan))  # ours, no job owns it
    try:
        world.wait("the orphan to go", lambda: not world.env_exists("gh-98-1"), timeout=60)
        time.sleep(3)  # one more reconcile round
        assert world.env_exists("gh-99-1")
    finally:
        world.tt.delete_env("gh-99-1")
