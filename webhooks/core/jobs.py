"""The life of one workflow job on our side: states, events, names, delivery checks. Pure.

    (new) --queued--> pending --provision--> provisioning --runner_started--> started
    started/provisioning --in_progress--> in_progress --completed / runner_exited--> completed
    completed --cleaned--> done;   provisioning --vm_failed--> pending (retried after a delay)

A job whose labels carry our marker but name nothing we serve is `unservable` (kept, visible).
Events can arrive late, twice or out of order (GitHub does not promise order): anything not in
the table leaves the state as it is.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Any

__all__ = [
    "ACTIVE",
    "OPEN",
    "TRANSITIONS",
    "Event",
    "State",
    "check_delivery_id",
    "env_name",
    "event_time",
    "parse_env_name",
    "parse_event",
    "parse_runner_name",
    "result_of",
    "retry_delay",
    "runner_name",
    "staleness",
    "transition",
]


class State(enum.StrEnum):
    PENDING = "pending"  # wants a VM (maybe later: limits, back-off after a failure)
    PROVISIONING = "provisioning"  # JIT config asked for, VM booting, runner being started
    STARTED = "started"  # the runner process runs in the VM
    IN_PROGRESS = "in_progress"  # GitHub says a runner took the job
    COMPLETED = "completed"  # the job or its runner ended; the VM is to be deleted
    DONE = "done"  # nothing of ours is left
    UNSERVABLE = "unservable"  # our marker label but a target we do not serve


class Event(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    PROVISION = "provision"
    RUNNER_STARTED = "runner_started"
    RUNNER_EXITED = "runner_exited"
    VM_FAILED = "vm_failed"
    CLEANED = "cleaned"
    REQUEUE = "requeue"  # reconcile: GitHub still has it queued but we have nothing for it


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.PENDING, E.PROVISION): S.PROVISIONING,
    (S.PENDING, E.COMPLETED): S.DONE,  # cancelled before we booted anything
    (S.PENDING, E.IN_PROGRESS): S.IN_PROGRESS,  # someone else's runner took it
    (S.PROVISIONING, E.RUNNER_STARTED): S.STARTED,
    (S.PROVISIONING, E.VM_FAILED): S.PENDING,
    (S.PROVISIONING, E.IN_PROGRESS): S.IN_PROGRESS,
    (S.PROVISIONING, E.COMPLETED): S.COMPLETED,
    (S.PROVISIONING, E.RUNNER_EXITED): S.COMPLETED,
    (S.STARTED, E.IN_PROGRESS): S.IN_PROGRESS,
    (S.STARTED, E.COMPLETED): S.COMPLETED,
    (S.STARTED, E.RUNNER_EXITED): S.COMPLETED,
    (S.STARTED, E.VM_FAILED): S.PENDING,  # the runner never came up: retry
    (S.IN_PROGRESS, E.COMPLETED): S.COMPLETED,
    (S.IN_PROGRESS, E.RUNNER_EXITED): S.COMPLETED,
    (S.IN_PROGRESS, E.RUNNER_STARTED): S.IN_PROGRESS,
    (S.COMPLETED, E.CLEANED): S.DONE,
    (S.DONE, E.REQUEUE): S.PENDING,
    (S.COMPLETED, E.REQUEUE): S.COMPLETED,  # clean first; the next reconcile requeues
}
ACTIVE = frozenset({S.PROVISIONING, S.STARTED, S.IN_PROGRESS})  # a VM may exist
OPEN = ACTIVE | {S.PENDING, S.COMPLETED}  # not finished on our side


def transition(state: State | None, event: Event) -> State | None:
    """The next state, or None when the event changes nothing (late, repeated, out of order).

    A job we have not seen starts on `queued`; a first `in_progress` or `completed` (its queued
    delivery was missed) is recorded too, so the VM bookkeeping stays right.
    """
    if state is None:
        return {
            E.QUEUED: S.PENDING,
            E.IN_PROGRESS: S.IN_PROGRESS,
            E.COMPLETED: S.DONE,
        }.get(event)
    return TRANSITIONS.get((state, event))


def retry_delay(attempts: int) -> float:
    """Seconds to wait before provisioning again after `attempts` failures (5 s doubling, 5 min)."""
    return float(min(300, 5 * 2 ** max(0, attempts - 1)))


# GitHub's conclusions -> the scheduler's job results (success, failed, cancelled, error).
_RESULTS = {
    "success": "success",
    "neutral": "success",
    "failure": "failed",
    "timed_out": "failed",
    "cancelled": "cancelled",
    "skipped": "cancelled",
}


def result_of(conclusion: str) -> str:
    """The job-history result for a GitHub conclusion (anything unknown is an error)."""
    return _RESULTS.get(conclusion, "error")


# -- names: a runner, its VM and its job can always be matched ---------------------------------
_RUNNER_RE = re.compile(r"\Att-(?P<job>[0-9]{1,20})-(?P<attempt>[0-9]{1,9})\Z")


def runner_name(job_id: int, attempt: int) -> str:
    return f"tt-{job_id}-{attempt}"


def env_name(job_id: int, attempt: int) -> str:
    return f"gh-{job_id}-{attempt}"


def parse_runner_name(name: str | None) -> tuple[int, int] | None:
    """(job id, attempt) for one of our runner names, else None."""
    m = _RUNNER_RE.match(name or "")
    return (int(m["job"]), int(m["attempt"])) if m else None


def parse_env_name(name: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"gh-([0-9]{1,20})-([0-9]{1,9})", name)
    return (int(m[1]), int(m[2])) if m else None


# -- delivery checks ---------------------------------------------------------------------------
_DELIVERY_RE = re.compile(r"\A[0-9A-Za-z-]{8,64}\Z")


def check_delivery_id(value: str | None) -> str | None:
    """None if X-GitHub-Delivery looks like GitHub's (a GUID), else what is wrong."""
    if not value:
        return "the delivery has no X-GitHub-Delivery header"
    if not _DELIVERY_RE.match(value):
        return "X-GitHub-Delivery is not a GUID"
    return None


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def event_time(action: str, job: dict[str, Any]) -> dt.datetime | None:
    """When the event happened according to GitHub's own payload."""
    key = {"queued": "created_at", "waiting": "created_at", "in_progress": "started_at"}.get(
        action, "completed_at"
    )
    return _parse_time(job.get(key)) or _parse_time(job.get("created_at"))


def staleness(action: str, job: dict[str, Any], now: dt.datetime, max_age_s: float) -> str | None:
    """None when the event is fresh, else why it is stale (a replay of an old delivery).

    GitHub signs the body only, with no timestamp header, so the payload's own times are the
    clock: an event older than max_age is refused (the reconciler still sees old queued jobs).
    """
    t = event_time(action, job)
    if t is None:
        return None
    age = (now - t).total_seconds()
    if age > max_age_s:
        return f"the event happened {age:.0f} s ago, more than --max-age {max_age_s:.0f} s"
    if age < -300:
        return f"the event is dated {-age:.0f} s in the future; is this host's clock right?"
    return None


def parse_event(payload: Any) -> tuple[str, dict[str, Any]]:
    """(action, workflow_job) of a workflow_job payload, or ValueError saying what is missing."""
    if not isinstance(payload, dict):
        raise ValueError("the body is not a JSON object")
    action = payload.get("action")
    job = payload.get("workflow_job")
    if not isinstance(action, str) or not isinstance(job, dict):
        raise ValueError("a workflow_job delivery needs `action` and a `workflow_job` object")
    labels = job.get("labels")
    if not _is_id(job.get("id")) or not isinstance(labels, list):
        raise ValueError("workflow_job needs an integer `id` and a `labels` list")
    if len(labels) > 100 or not all(isinstance(x, str) and len(x) <= 200 for x in labels):
        raise ValueError("workflow_job `labels` must be at most 100 strings")
    if job.get("run_id") is not None and not _is_id(job["run_id"]):
        raise ValueError("workflow_job `run_id` must be an integer")
    repo = payload.get("repository")
    if not isinstance(repo, dict) or not isinstance(repo.get("full_name"), str):
        raise ValueError("the delivery needs `repository.full_name`")
    inst = payload.get("installation")
    if inst is not None and not (
        isinstance(inst, dict) and (inst.get("id") is None or _is_id(inst["id"]))
    ):
        raise ValueError("`installation` must be an object with an integer `id`")
    return action, job


def _is_id(value: Any) -> bool:
    """A GitHub id: a positive JSON integer that fits SQLite (not a boolean, not a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63
