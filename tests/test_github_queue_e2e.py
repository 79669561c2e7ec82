"""GitHub jobs on a cloud with room for two 1-CPU VMs, for real: `tt up`'s hostd and scheduler,
`tt-github-webhooks serve` as a subprocess, GitHub played by the OpenAPI stand-in, the stand-in
run.sh in each VM. More jobs than fit all run and complete with one JIT registration each (asked
for only when the scheduler grants the capacity); a job GitHub cancels while it waits in TT CI's
queue leaves nothing behind; an old redelivery of a job GitHub still queues is served."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest

from tests.cloudutil import small_cloud
from tests.conftest import built_image
from tests.github.e2e import AMD64, GitHubSide, github_service
from tests.github.payloads import job_event

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
BIG, SMALL = "octo-org/big", "small-org/app"


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHubSide]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("ghqueue")
    with (
        small_cloud(state, cpu_total=2, mem_total=2048) as stack,
        github_service(
            state / "github",
            stack.scheduler,
            stack.token,
            *("--max-waiting", "2", "--reconcile-interval", "5"),
        ) as s,
    ):
        yield s
        s.wait("no ENV left", lambda: s.tt.get("/v1/envs") == [], timeout=60)


def test_more_jobs_than_capacity_all_run_with_one_jit_runner_each(side: GitHubSide) -> None:
    jobs = [(83000 + i, BIG) for i in range(4)] + [(83100 + i, SMALL) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # as a mixed test runs it
        burst = pool.submit(side.run_burst, jobs, 900)  # the big repository's jobs first
        seen: list[dict[str, object]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and not seen:  # TT CI's queue holds some of ours
            seen = [q for q in side.tt.get("/v1/queue") if q["kind"] == "github"]
            time.sleep(0.2)
        # run_burst asserts: all done, none failed or retried, one generate-jitconfig each
        burst.result()
    assert seen and {q["project"] for q in seen} <= {f"github:{BIG}", f"github:{SMALL}"}
    reasons = [r for jid, _ in jobs for r in side.reasons[jid]]
    assert any(r.startswith("queued in TT CI at position") for r in reasons), reasons
    assert any("--max-waiting" in r for r in reasons), reasons  # held here beyond 2 waiting
    history = {j["env"]: j["result"] for j in side.tt.get("/v1/jobs") if j.get("env")}
    assert all(history.get(f"gh-{jid}-1") == "success" for jid, _ in jobs)


def test_a_job_cancelled_while_queued_leaves_the_queue_and_nothing_behind(
    side: GitHubSide,
) -> None:
    running = [(83200, BIG), (83201, BIG)]
    for jid, repo in running:
        side.queue(jid, repo)
    side.wait(
        "both runners started",
        lambda: all(side.jobs()[j]["state"] == "started" for j, _ in running),
        timeout=300,
    )
    jid = 83202
    side.queue(jid, SMALL)
    side.wait(
        "its place in TT CI's queue",
        lambda: side.jobs()[jid]["reason"].startswith("queued in TT CI at position 1"),
        timeout=60,
    )
    env = f"gh-{jid}-1"
    assert side.tt.show_env(env)["state"] == "queued"
    side.gh.jobs[jid]["status"] = "completed"
    r = side.send(job_event("completed", jid, AMD64, repo=SMALL, conclusion="cancelled"))
    assert r.status_code == 202
    side.wait("the job done", lambda: side.jobs()[jid]["state"] == "done", timeout=30)
    assert not side.env_exists(env)
    assert env not in [q["env"] for q in side.tt.get("/v1/queue")]
    assert f"tt-{jid}-1" not in side.jit_calls()  # it never had capacity: no runner registered
    assert side.jobs()[jid]["attempt"] == 1  # cancelled, not retried
    for j, repo in running:
        side.finish(j, repo)
    side.wait("done", lambda: all(side.jobs()[j]["state"] == "done" for j, _ in running))
    time.sleep(6)  # a reconcile round: nothing comes back for the cancelled job
    assert side.jobs()[jid]["state"] == "done" and not side.env_exists(env)


def test_an_old_redelivery_of_a_job_github_still_queues_is_served(side: GitHubSide) -> None:
    jid, repo = 83300, "small-org/fresh"  # a repository the reconciler does not know yet
    side.gh.add_job(repo, jid, AMD64, "queued")
    old = job_event("queued", jid, AMD64, repo=repo, age_s=7200)  # past --max-age (3600 s)
    r = side.send(old, delivery="5b1c2d3e-7a8b-11f0-9c1e-1c2b3d4e5f60")
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    assert "GitHub still shows the job queued" in r.json()["note"]
    rows = side.drive([(jid, repo)], timeout=300)
    assert rows[jid]["conclusion"] == "success" and side.jit_calls()[f"tt-{jid}-1"] == 1
