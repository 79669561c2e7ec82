"""How GitHub jobs wait for TT CI's capacity, and when an old delivery is still served. Pure.

Every job that needs a VM waits in the scheduler's admission queue (its ENV request is made
with `wait`), where the scheduler orders it by priority, fair share and age against every other
CI. A waiting request holds one progress stream to the scheduler (and one thread here) for as
long as it waits, so the service keeps at most `--max-waiting` of its jobs in that queue at
once; the rest stay `pending` here. Which pending jobs go next is shared out between
repositories (`pick_to_submit`): a repository that queued 40 jobs does not fill every slot
before one that queued 2 gets any, so the scheduler's fair share sees both.

The JIT runner config is asked for once per attempt, when the scheduler grants the capacity
(never for a job that only waits), so a busy cloud never costs a second runner registration.

A `queued` delivery older than `--max-age` is a replay or a redelivery; GitHub lets operators
redeliver for days. It is served when GitHub itself still shows the job queued
(`stale_verdict`); a delivery refused as stale may come again under the same
X-GitHub-Delivery id (that is what a redelivery is) and is then looked at afresh
(`redeliverable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ttci.wire.queue import QueueInfo
from webhooks.core.jobs import State

__all__ = [
    "NOT_STARTED",
    "STALE",
    "STALE_FINAL",
    "Candidate",
    "after_stream_end",
    "pick_to_submit",
    "queue_reason",
    "redeliverable",
    "stale_verdict",
    "waiting_reason",
]

STALE = "stale"  # refused as stale, GitHub not asked (or not answering): a redelivery is looked at
STALE_FINAL = "stale-final"  # stale, and GitHub said the job is no longer queued: a replay
# GitHub's job statuses before a runner takes the job (`waiting`: a deployment gate)
NOT_STARTED = frozenset({"queued", "waiting", "pending", "requested"})


@dataclass(frozen=True)
class Candidate:
    """A pending job that may go into TT CI's queue: its id, repository and arrival time."""

    id: int
    repo: str
    queued_at: float


def pick_to_submit(
    pending: Iterable[Candidate], waiting_by_repo: Mapping[str, int], slots: int
) -> list[int]:
    """Which pending jobs to put into TT CI's queue now, at most `slots`, in order.

    Round robin between repositories: each pick goes to the repository with the fewest jobs
    already waiting in TT CI's queue (counting this round's picks), its oldest job first; ties
    between repositories go to the one whose next job is older.
    """
    if slots <= 0:
        return []
    per_repo: dict[str, list[Candidate]] = {}
    for c in sorted(pending, key=lambda c: (c.queued_at, c.id)):
        per_repo.setdefault(c.repo, []).append(c)
    held = {repo: waiting_by_repo.get(repo, 0) for repo in per_repo}
    out: list[int] = []
    while len(out) < slots and per_repo:
        repo = min(per_repo, key=lambda r: (held[r], per_repo[r][0].queued_at, r))
        out.append(per_repo[repo].pop(0).id)
        held[repo] += 1
        if not per_repo[repo]:
            del per_repo[repo]
    return out


def queue_reason(info: QueueInfo) -> str:
    """What the job list says while the job waits in TT CI's queue."""
    what = info.blocked_by.replace("_", " ")
    detail = f": {info.detail}" if info.detail else ""
    return f"queued in TT CI at position {info.position} ({what}{detail})"


def waiting_reason(max_waiting: int) -> str:
    """What the job list says for a job held here because enough of ours wait in TT CI (the
    same words for every such job, so a burst is not rewritten on every pass)."""
    if max_waiting <= 0:
        return "waiting here: --max-waiting is 0, no job is handed to TT CI"
    return (
        f"waiting here: {max_waiting} jobs of this service already wait in TT CI's queue "
        "(--max-waiting); the next free place goes to the repository with the fewest there"
    )


def after_stream_end(state_now: State | None) -> str:
    """What an ENV request that ended without a VM means, by the job's state at that moment:
    `cancelled` when the job left `provisioning` meanwhile (a `completed` webhook or the
    reconciler took its request out of the queue: nothing to retry), else `retry`."""
    return "retry" if state_now is State.PROVISIONING else "cancelled"


def redeliverable(outcome: str | None) -> bool:
    """Whether a delivery id seen before may be handled again: only one refused as stale
    without GitHub's word (a redelivery asks again); anything else is a replay."""
    return outcome == STALE


def stale_verdict(github_status: str | None) -> tuple[bool, str]:
    """(serve?, why) for a stale `queued` delivery, from GitHub's status of the job now."""
    if github_status in NOT_STARTED:
        return True, f"GitHub still shows the job {github_status}"
    if github_status is None:
        return False, "GitHub does not know the job"
    return False, f"GitHub shows the job {github_status}"
