"""GitHub jobs wait in TT CI's admission queue: the whole service (Flask app under waitress, its
dispatcher and provisioning threads, real PyGithub against the OpenAPI stand-in) with a fake
scheduler client that has room for a few VMs (tests/github/fake_tt.py). A burst larger than the
cloud all runs, one JIT runner per job, asked for only when capacity is granted; at most
--max-waiting jobs wait in TT CI's queue, shared out between repositories; a job cancelled while
queued leaves the queue; an old redelivery is served when GitHub still has the job queued."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from tests.github.fake_tt import FakeTT
from tests.github.payloads import deliver, job_event
from tests.github.standin import StandIn
from tests.github.util import app_keys, serving
from ttci.client.scheduler import Client
from webhooks.app import create_app
from webhooks.github_api import GitHubAPI, GitHubConfig
from webhooks.service import Service, Settings
from webhooks.store import JobStore

SECRET = b"webhook-secret-for-queue-tests-81c2"
OURS = ["self-hosted", "tt", "debian-12", "amd64"]
JIT_OP = "actions/generate-runner-jitconfig-for-repo"


@dataclass
class Q:
    url: str
    svc: Service
    gh: StandIn
    tt: FakeTT

    def send(self, payload: object, **kw: Any) -> requests.Response:
        return deliver(self.url + "/webhook", payload, SECRET, **kw)

    def job(self, jid: int) -> dict[str, Any]:
        row = self.svc.store.get(jid)
        assert row is not None, f"job {jid} not recorded"
        return row

    def jit_calls(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.gh.calls(JIT_OP):
            out[s.body["name"]] = out.get(s.body["name"], 0) + 1
        return out

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)


def _world(tmp_path: Path, capacity: int, max_waiting: int, database: str = "") -> Iterator[Q]:
    _, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    gh.installations["small-org"] = 4243
    api = GitHubAPI(GitHubConfig(base_url=gh.url, app_id="31337", private_key=app_keys()[0]))
    tt = FakeTT(capacity)
    settings = Settings(max_waiting=max_waiting, reconcile_interval_s=3600)
    svc = Service(settings, JobStore(database or tmp_path / "github.db"), api, cast(Client, tt))
    with serving(create_app(svc, SECRET)) as url:
        yield Q(url, svc, gh, tt)
    svc.stop()
    svc.store.store.close()
    api.close()
    gh.stop()


@pytest.fixture
def q(tmp_path: Path, database: str) -> Iterator[Q]:
    yield from _world(tmp_path, capacity=2, max_waiting=3, database=database)


def _finish(q: Q, jid: int, repo: str) -> None:
    """As GitHub and the runner do it: in_progress, the runner exits, completed."""
    runner = q.job(jid)["runner_name"]
    q.send(job_event("in_progress", jid, OURS, repo=repo, runner_name=runner))
    q.tt.end_runner(q.job(jid)["env"])
    q.send(job_event("completed", jid, OURS, repo=repo, runner_name=runner, conclusion="success"))


def test_a_burst_bigger_than_the_cloud_all_runs_with_one_jit_runner_each(q: Q) -> None:
    big = [(8100 + i, "octo-org/big") for i in range(8)]
    small = [(8200 + i, "small-org/app") for i in range(2)]
    for jid, repo in big + small:  # the big repository's jobs all arrive first
        assert q.send(job_event("queued", jid, OURS, repo=repo)).json()["status"] == "queued"
    # three places in TT CI's queue (--max-waiting 3): shared out between the repositories
    assert q.svc.dispatch_once() == 3
    # handed over = its first attempt began (its thread may already have started the runner)
    handed = {jid for jid, _ in big + small if q.job(jid)["attempt"] == 1}
    assert handed == {8100, 8200, 8101}
    assert "--max-waiting" in q.job(8107)["reason"] and q.job(8107)["state"] == "pending"
    q.svc.start(reconcile_loop=False)
    reasons: set[str] = set()
    done: set[int] = set()
    deadline = time.monotonic() + 60
    while len(done) < 10:
        assert time.monotonic() < deadline, {j: q.job(j)["state"] for j, _ in big + small}
        with q.svc._live_lock:
            assert len(q.svc._in_queue) <= 3  # never more waiting than --max-waiting
        assert len(q.tt.running()) <= 2  # the cloud's capacity
        for jid, repo in big + small:
            row = q.job(jid)
            reasons.add(row["reason"].split(" at position")[0])
            if row["state"] == "started" and jid not in done:
                _finish(q, jid, repo)
                done.add(jid)
        time.sleep(0.02)
    q.wait("every job done", lambda: all(q.job(j)["state"] == "done" for j, _ in big + small))
    assert "queued in TT CI" in reasons  # its place in TT CI's line, while it waited there
    for jid, _ in big + small:
        row = q.job(jid)
        assert row["attempt"] == 1 and row["conclusion"] == "success"  # none failed or retried
    # exactly one JIT runner per job, each asked for after its capacity was granted
    assert q.jit_calls() == {f"tt-{jid}-1": 1 for jid, _ in big + small}
    for s in q.gh.calls(JIT_OP):
        env = "gh-" + s.body["name"].removeprefix("tt-")
        assert s.at >= q.tt.granted[env]
    assert q.gh.runners.get("octo-org/big", {}) == {} and q.tt.running() == []
    # the small repository did not wait behind all of the big one's jobs
    order = sorted(q.tt.granted, key=q.tt.granted.__getitem__)
    assert max(order.index(f"gh-{jid}-1") for jid, _ in small) < 4


def test_completed_while_queued_leaves_the_queue_and_costs_no_runner(q: Q) -> None:
    q.svc.start(reconcile_loop=False)
    for jid in (8301, 8302, 8303):
        q.send(job_event("queued", jid, OURS))
    q.wait("two running, one queued", lambda: len(q.tt.running()) == 2 and len(q.tt.queue) == 1)
    [queued] = q.tt.queue
    jid = int(queued.split("-")[1])
    q.wait("its place", lambda: "queued in TT CI at position 1" in q.job(jid)["reason"])
    assert "capacity" in q.job(jid)["reason"]
    listed = requests.get(q.url + "/jobs?state=provisioning", timeout=5).json()
    assert any("queued in TT CI at position 1" in j["reason"] for j in listed)
    q.send(job_event("completed", jid, OURS, conclusion="cancelled"))
    q.wait("the job done", lambda: q.job(jid)["state"] == "done")
    assert q.tt.envs[queued].state == "gone" and queued not in q.tt.queue
    assert f"tt-{jid}-1" not in q.jit_calls()  # it never got capacity: no runner asked for
    assert q.job(jid)["attempt"] == 1  # cancelled, not retried
    metrics = requests.get(q.url + "/metrics", timeout=5).text
    assert 'ttci_github_jobs_total{outcome="cancelled"} 1.0' in metrics
    assert 'ttci_github_jobs_total{outcome="retry"}' not in metrics
    for other in {8301, 8302, 8303} - {jid}:
        q.wait("started", lambda o=other: q.job(o)["state"] == "started")  # type: ignore[misc]
        _finish(q, other, "octo-org/hello")
    q.wait("all done", lambda: all(q.job(j)["state"] == "done" for j in (8301, 8302, 8303)))


def test_taken_by_another_runner_while_queued_withdraws_the_request(q: Q) -> None:
    q.svc.start(reconcile_loop=False)
    for jid in (8401, 8402, 8403):
        q.send(job_event("queued", jid, OURS))
    q.wait("two running, one queued", lambda: len(q.tt.running()) == 2 and len(q.tt.queue) == 1)
    [queued] = q.tt.queue
    jid = int(queued.split("-")[1])
    q.send(job_event("in_progress", jid, OURS, runner_name="someone-elses-runner"))
    q.wait("withdrawn", lambda: q.tt.envs[queued].state == "gone")
    assert f"tt-{jid}-1" not in q.jit_calls()
    q.send(job_event("completed", jid, OURS, runner_name="someone-elses-runner"))
    q.wait("done", lambda: q.job(jid)["state"] == "done")
    for other in {8401, 8402, 8403} - {jid}:
        q.wait("started", lambda o=other: q.job(o)["state"] == "started")  # type: ignore[misc]
        _finish(q, other, "octo-org/hello")
    q.wait("all done", lambda: all(q.job(j)["state"] == "done" for j in (8401, 8402, 8403)))


def test_max_waiting_zero_hands_nothing_over(tmp_path: Path) -> None:
    for q in _world(tmp_path, capacity=2, max_waiting=0):
        q.send(job_event("queued", 8501, OURS))
        assert q.svc.dispatch_once() == 0
        assert q.job(8501)["state"] == "pending" and "--max-waiting is 0" in q.job(8501)["reason"]
        assert q.tt.envs == {}


def test_old_redelivery_is_served_when_github_still_queues_the_job(q: Q) -> None:
    old = job_event("queued", 8601, OURS, age_s=7200)  # older than --max-age (3600 s)
    q.gh.add_job("octo-org/hello", 8601, OURS, "queued")
    r = q.send(old, delivery="0e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    assert "GitHub still shows the job queued" in r.json()["note"]
    assert q.job(8601)["state"] == "pending"
    # the same delivery again: now a replay (it was served)
    r = q.send(old, delivery="0e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 409 and "already received" in r.json()["error"]


def test_old_delivery_for_a_finished_job_is_refused_for_good(q: Q) -> None:
    old = job_event("queued", 8602, OURS, age_s=7200)
    q.gh.add_job("octo-org/hello", 8602, OURS, "completed")
    r = q.send(old, delivery="1e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 409 and "GitHub shows the job completed" in r.json()["error"]
    r = q.send(old, delivery="1e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 409 and "already received" in r.json()["error"]
    assert q.svc.store.get(8602) is None


def test_stale_refused_then_redelivered_is_served(q: Q) -> None:
    """GitHub does not answer the first time: refused as stale; GitHub's redelivery (same
    X-GitHub-Delivery) is looked at afresh and served."""
    old = job_event("queued", 8603, OURS, age_s=7200)
    q.gh.add_job("octo-org/hello", 8603, OURS, "queued")
    q.gh.fail("actions/get-job-for-workflow-run", 502, message="Server Error", count=10)
    r = q.send(old, delivery="2e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 409 and "stale delivery" in r.json()["error"]
    assert "redeliver" in r.json()["hint"] and q.svc.store.get(8603) is None
    q.gh.faults.clear()
    r = q.send(old, delivery="2e2d7c1a-6b1f-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    assert q.job(8603)["state"] == "pending"


def test_old_deliveries_of_other_kinds_are_still_refused_without_asking(q: Q) -> None:
    q.gh.add_job("octo-org/hello", 8604, OURS, "queued")
    r = q.send(job_event("in_progress", 8604, OURS, age_s=7200, runner_name="tt-8604-1"))
    assert r.status_code == 409 and "stale delivery" in r.json()["error"]
    foreign = job_event("queued", 8605, ["ubuntu-latest"], age_s=7200)
    assert q.send(foreign).status_code == 409
    assert q.gh.calls("actions/get-job-for-workflow-run") == []


def test_reconciler_never_deletes_the_env_of_a_job_just_handed_over(
    q: Q, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler's snapshot of our jobs may predate a job handed to TT CI's queue: its
    ENV must not be taken for an orphan (it was, once: the job retried twice, a runner each)."""
    q.svc.start(reconcile_loop=False)
    for jid in (8701, 8702, 8703):
        q.gh.add_job("octo-org/hello", jid, OURS, "queued")
        q.send(job_event("queued", jid, OURS))
    q.wait("one waiting in TT CI", lambda: len(q.tt.queue) == 1)
    [queued] = q.tt.queue
    jid = int(queued.split("-")[1])
    real = q.svc.store.open_jobs

    def stale_snapshot(include_done_since: float = 0.0) -> list[dict[str, Any]]:
        rows = real(include_done_since)
        return [{**r, "state": "pending", "env": ""} if r["id"] == jid else r for r in rows]

    monkeypatch.setattr(q.svc.store, "open_jobs", stale_snapshot)
    repairs = q.svc.reconcile_once()
    assert [r.env for r in repairs if r.kind == "delete_env"] == [queued]  # planned ...
    assert q.tt.envs[queued].state == "queued" and q.job(jid)["attempt"] == 1  # ... not done
    monkeypatch.undo()
    for other in (8701, 8702, 8703):
        q.wait("started", lambda o=other: q.job(o)["state"] == "started")  # type: ignore[misc]
        _finish(q, other, "octo-org/hello")
    q.wait("all done", lambda: all(q.job(j)["state"] == "done" for j in (8701, 8702, 8703)))
    assert q.jit_calls() == {f"tt-{j}-1": 1 for j in (8701, 8702, 8703)}
