"""The GitHub side of real-VM tests: `tt-github-webhooks serve` as a subprocess (as an operator
starts it) against a running TT CI cloud, the OpenAPI stand-in as GitHub (App auth, installations
for the test owners), the stand-in run.sh pushed into each VM, and helpers that play GitHub:
queue jobs, finish the ones whose runner started, count JIT registrations.

Used by tests/test_github_queue_e2e.py; a mixed test (GitLab, GitHub and `tt job run` on one
small cloud) can use it too:

    with github_service(tmp, stack.scheduler, stack.token, "--max-waiting", "2") as side:
        # in a thread beside the GitLab stages and `tt job run`s:
        side.run_burst([(84000 + i, "octo-org/big") for i in range(4)], timeout=900)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.cloudutil import free_port
from tests.github.payloads import deliver, job_event
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys, serve_argv
from ttci.client.config import ClientConfig
from ttci.client.scheduler import ApiError, Client
from ttci.infra.proc import stop
from ttci.wire.commands import EventKind, ExecRequest

__all__ = ["AMD64", "JIT_OP", "SECRET", "GitHubSide", "github_service"]

SECRET = "e2e-queue-webhook-secret-5a0e"
AMD64 = ["self-hosted", "tt", "debian-12", "amd64"]
JIT_OP = "actions/generate-runner-jitconfig-for-repo"
OWNERS = {"octo-org": 4242, "small-org": 4243}


@dataclass
class GitHubSide:
    url: str  # the webhook service
    gh: StandIn
    tt: Client
    log: Path
    proc: subprocess.Popen[bytes]
    reasons: dict[int, list[str]] = field(default_factory=dict)  # every reason seen, in order

    def send(self, payload: dict[str, Any], **kw: Any) -> requests.Response:
        return deliver(self.url + "/webhook", payload, SECRET.encode(), **kw)

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

    def jit_calls(self) -> dict[str, int]:
        """generate-jitconfig calls GitHub saw, per runner name."""
        out: dict[str, int] = {}
        for s in self.gh.calls(JIT_OP):
            out[s.body["name"]] = out.get(s.body["name"], 0) + 1
        return out

    # -- playing GitHub ------------------------------------------------------------------------
    def queue(self, jid: int, repo: str, labels: list[str] | None = None) -> requests.Response:
        """GitHub queues a job and delivers `queued`."""
        labels = labels or AMD64
        self.gh.add_job(repo, jid, labels, "queued")
        r = self.send(job_event("queued", jid, labels, repo=repo))
        assert r.status_code == 202, r.text
        return r

    def finish(self, jid: int, repo: str, labels: list[str] | None = None) -> None:
        """The job's runner started: check it got the JIT config GitHub issued for it, then the
        runner takes the job (in_progress) and the job ends (completed, success)."""
        labels = labels or AMD64
        job = self.jobs()[jid]
        env, runner = job["env"], job["runner_name"]
        record = dict(
            line.split("=", 1) for line in self.in_vm(env, "cat /tmp/tt-runner-record").splitlines()
        )
        assert record["env_jit"] == self.gh.issued[runner], f"job {jid}: not its JIT config"
        self.gh.jobs[jid]["status"] = "in_progress"
        self.send(job_event("in_progress", jid, labels, repo=repo, runner_name=runner))
        self.gh.jobs[jid]["status"] = "completed"
        self.send(
            job_event("completed", jid, labels, repo=repo, runner_name=runner, conclusion="success")
        )

    def drive(self, jobs: list[tuple[int, str]], timeout: float = 600) -> dict[int, dict[str, Any]]:
        """Finish each job as its runner starts, until every one is done; their last rows.
        Every reason each job showed on the way is kept in self.reasons."""
        deadline = time.monotonic() + timeout
        finished: set[int] = set()
        while True:
            rows = self.jobs()
            for jid, repo in jobs:
                row = rows.get(jid, {})
                seen = self.reasons.setdefault(jid, [])
                if row.get("reason") and (not seen or seen[-1] != row["reason"]):
                    seen.append(row["reason"])
                if row.get("state") == "started" and jid not in finished:
                    self.finish(jid, repo)
                    finished.add(jid)
            if all(rows.get(jid, {}).get("state") == "done" for jid, _ in jobs):
                return {jid: rows[jid] for jid, _ in jobs}
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"jobs not done in {timeout:.0f} s: "
                    f"{ {j: rows.get(j, {}).get('state') for j, _ in jobs} }; "
                    f"log tail: {self.log.read_text()[-3000:]}"
                )
            time.sleep(0.3)

    def run_burst(
        self, jobs: list[tuple[int, str]], timeout: float = 900
    ) -> dict[int, dict[str, Any]]:
        """GitHub queues every job at once; each runs when TT CI grants it a VM and completes.
        Asserts what the admission queue promises GitHub: every job done, none failed or
        retried, exactly one generate-jitconfig call per job, no runner left registered."""
        for jid, repo in jobs:
            self.queue(jid, repo)
        rows = self.drive(jobs, timeout)
        for jid, _ in jobs:
            assert rows[jid]["attempt"] == 1 and rows[jid]["conclusion"] == "success", rows[jid]
        calls = self.jit_calls()
        assert {f"tt-{jid}-1": calls.get(f"tt-{jid}-1") for jid, _ in jobs} == {
            f"tt-{jid}-1": 1 for jid, _ in jobs
        }
        for _, repo in jobs:
            assert self.gh.runners.get(repo, {}) == {}, f"runners left on {repo}"
        return rows


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


@contextmanager
def github_service(
    state: Path, scheduler: str, token: str, *extra: str, run_sh: Path = RUN_SH
) -> Iterator[GitHubSide]:
    """The webhook service against the cloud at `scheduler` (its admin token), GitHub played by
    the stand-in; extra: more `serve` flags; run_sh: the runner pushed into each VM (the stand-in
    by default). On exit: the service stopped, no secret in its log."""
    state.mkdir(parents=True, exist_ok=True)
    private, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations.update(OWNERS)
    key = state / "app.pem"
    key.write_text(private)
    runner = state / "runner"
    runner.mkdir(exist_ok=True)
    (runner / "run.sh").write_bytes(run_sh.read_bytes())
    (runner / "run.sh").chmod(0o755)
    port = free_port()
    log = state / "webhooks.log"
    env = {
        **os.environ,
        "TT_SERVER": scheduler,
        "TT_TOKEN": token,
        "TT_CONFIG": str(state / "no-client.json"),
        "TT_GH_WEBHOOK_SECRET": SECRET,
    }
    argv = serve_argv(
        state / "gh",
        gh.url,
        key,
        port,
        *("--push-runner", str(runner), "--mem", "384", "--runner-timeout", "300"),
        *extra,
    )
    with log.open("ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
    tt = Client(ClientConfig(scheduler, token))
    side = GitHubSide(f"http://127.0.0.1:{port}", gh, tt, log, proc)
    try:
        side.wait("the service", lambda: _up(side.url), timeout=30)
        yield side
    finally:
        code = stop(proc, grace=30)
        tt.session.close()
        gh.stop()
    assert code != -signal.SIGKILL, "the service ignored SIGTERM for 30 s"
    text = log.read_text()
    assert SECRET not in text
    assert not any(jit in text for jit in gh.issued.values())
    assert not any(tok in text for tok in gh.tokens)
