"""Reconciliation: compare GitHub's view with ours and say what to repair. Pure.

Drift it repairs: a `queued` webhook that never arrived (adopt the job), a job GitHub finished
while we missed `completed` (delete its VM), a runner that never came up (retry on a new VM), a
job we finished whose runner exited before taking it while GitHub still has it queued (requeue),
and ENVs of ours that no open job owns (delete them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from webhooks.core.jobs import ACTIVE, State, parse_env_name

__all__ = ["OurJob", "Repair", "plan"]


@dataclass(frozen=True)
class OurJob:
    id: int
    state: State
    env: str  # the ENV of the current attempt, "" if none
    since: float  # when the job entered its state (epoch seconds)
    live: bool  # a worker thread is attending to it right now


@dataclass(frozen=True)
class Repair:
    kind: str  # adopt | requeue | complete | retry | cleanup | delete_env
    job_id: int = 0
    env: str = ""
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False)


def plan(
    ours: list[OurJob],
    *,
    github_status: dict[int, str | None],
    github_queued: list[dict[str, Any]],
    envs: list[str],
    now: float,
    runner_timeout_s: float,
) -> list[Repair]:
    """What to do so that our state matches GitHub's.

    Args:
        ours: our open and recently finished jobs.
        github_status: GitHub's status of our open jobs (None: GitHub does not know the job).
        github_queued: queued jobs GitHub lists for the repositories we serve ({id, ...}).
        envs: names of the ENVs of ours that exist on the scheduler.
        runner_timeout_s: how long a started runner may take to pick up its job.
    """
    out: list[Repair] = []
    by_id = {j.id: j for j in ours}
    for q in github_queued:
        if q["id"] not in by_id:
            out.append(Repair("adopt", q["id"], reason="queued on GitHub, no webhook seen", data=q))
    for j in ours:
        gh = github_status.get(j.id, "unknown")
        if (gh == "completed" or gh is None) and (j.state in ACTIVE or j.state == State.PENDING):
            why = "GitHub says the job completed" if gh else "GitHub no longer knows the job"
            out.append(Repair("complete", j.id, j.env, why))
            continue
        if j.state == State.COMPLETED:
            out.append(Repair("cleanup", j.id, j.env, "the job ended; its VM goes"))
        elif j.state == State.DONE and gh == "queued":
            out.append(Repair("requeue", j.id, reason="our runner left; GitHub still queues it"))
        elif j.state == State.PROVISIONING and not j.live:
            out.append(Repair("retry", j.id, j.env, "provisioning was cut short (restart?)"))
        elif j.state == State.STARTED and gh == "queued" and now - j.since > runner_timeout_s:
            out.append(
                Repair(
                    "retry",
                    j.id,
                    j.env,
                    f"the runner did not take the job within {runner_timeout_s:.0f} s",
                )
            )
    owned = {j.env for j in ours if j.env and j.state in (ACTIVE | {State.COMPLETED})}
    for name in envs:
        if parse_env_name(name) is not None and name not in owned:
            out.append(Repair("delete_env", env=name, reason="no open job owns this ENV"))
    return out
