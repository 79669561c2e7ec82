"""Ending a job: its runner removed, its result reported, its VM deleted; and the reconciler."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ttci.model.errors import TTError
from ttci.wire.jobs import JobResult
from webhooks.core import reconcile
from webhooks.core.caches import job_cache
from webhooks.core.jobs import (
    ACTIVE,
    Event,
    State,
    parse_env_name,
    parse_runner_name,
    result_of,
    retry_delay,
)
from webhooks.core.labels import parse_labels
from webhooks.github_api import GitHubError, RateLimited
from webhooks.service_base import LEASE, ServiceBase

__all__ = ["Cleanup"]

log = logging.getLogger("webhooks")
OWNS_VM = ACTIVE | {State.COMPLETED}  # as core/reconcile.py counts owners
CONCLUSION_WAIT_S = 60.0  # a job with a cache: how long its cleanup waits for GitHub's verdict


class Cleanup(ServiceBase):
    def _submit_cleanup(self, jid: int) -> None:
        self._spawn(self._cleanup, jid)

    def _cleanup(self, jid: int) -> None:
        """Delete the job's VM and its runner registration; idempotent, one at a time per job
        (the `completed` delivery and the runner's exit both ask for it)."""
        with self._live_lock:
            lock = self._cleanup_locks.setdefault(jid, threading.Lock())
        with lock:
            job = self.store.get(jid)
            if job is None or job["state"] in (State.DONE.value, State.UNSERVABLE.value):
                return
            commit = self._succeeded(jid, job)
            if job["env"] and not self._delete_env(job["env"], commit):
                return  # the reconciler tries again
            self._remove_runner(job)
            _, new = self.store.apply(jid, Event.CLEANED)
            if new is not None:
                self.metrics.jobs.labels("done").inc()
                self._report(job)
                log.info("job %s: VM %s deleted", jid, job["env"], extra={"job": jid})
        with self._live_lock:
            self._cleanup_locks.pop(jid, None)
        self._wake.set()

    def _remove_runner(self, job: dict[str, Any]) -> None:
        """Deregister our JIT runner (gone already after it ran a job: that is fine)."""
        if not job.get("runner_id"):
            return
        try:
            self.gh.delete_runner(job["repo"], job["installation_id"], int(job["runner_id"]))
        except GitHubError as e:
            log.warning("job %s: runner %s not removed: %s", job["id"], job["runner_name"], e)

    def _report(self, job: dict[str, Any]) -> None:
        """Tell the scheduler's job history how GitHub says the job ended."""
        if job.get("env") and job.get("conclusion"):
            try:
                self.tt.report_result(job["env"], JobResult(result_of(job["conclusion"])))
            except TTError as e:
                log.warning("job %s: result not reported: %s", job["id"], e)

    def _succeeded(self, jid: int, job: dict[str, Any]) -> bool:
        """Whether GitHub says the job succeeded (its cache is then committed). A repository
        with a cache waits a little for the `completed` delivery when the runner's exit came
        first."""
        deadline = time.monotonic() + CONCLUSION_WAIT_S
        while not job.get("conclusion") and job_cache(job["repo"], self.s.repo_cache):
            if time.monotonic() > deadline or self._stop.wait(1.0):
                break
            job = self.store.get(jid) or job
        return job.get("conclusion") == "success"

    def _delete_env(self, env: str, commit_cache: bool = False) -> bool:
        """Delete the ENV (gone already is fine). One still being created is not waited for:
        the reconciler tries again. commit_cache: the job succeeded; its cache keeps what it
        wrote."""
        try:
            self.tt.delete_env_wait(env, wait_s=0, commit_cache=commit_cache)
        except TTError as e:
            log.warning("ENV %s not deleted: %s", env, e, extra={"env": env})
            return False
        return True

    # -- reconciliation ----------------------------------------------------------------------
    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.s.reconcile_interval_s):
            if not self.leases.held(LEASE):  # another replica reconciles
                continue
            try:
                self.reconcile_once()
            except RateLimited as e:
                log.warning("reconcile: %s", e)
                self._stop.wait(e.retry_after)
            except Exception:
                log.exception("reconcile failed; next round in %.0f s", self.s.reconcile_interval_s)

    def reconcile_once(self) -> list[reconcile.Repair]:
        """One round: ask GitHub and the scheduler, diff, repair. Returns what it did."""
        now = time.time()
        # ENVs first, then our rows: a job's row names its ENV before the ENV is asked for, so
        # every ENV listed has its owner in the rows read after
        envs = self._our_envs()
        rows = self.store.open_jobs(include_done_since=now - 3600)
        with self._live_lock:
            live = set(self._live)
        status: dict[int, str | None] = {}
        for r in rows:
            status[r["id"]] = self.gh.job_status(r["repo"], r["installation_id"], r["id"])
        repos = dict(self.store.repos())
        for extra in self.s.repos:
            repos.setdefault(extra, None)
        queued: list[dict[str, Any]] = []
        for repo, inst in repos.items():
            for q in self.gh.queued_jobs(repo, inst):
                if parse_labels(q["labels"], self.s.marker).ours:
                    queued.append({**q, "repo": repo, "installation_id": inst})
        ours = [
            reconcile.OurJob(
                r["id"],
                State(r["state"]),
                r["env"] or "",
                float(r["state_since"] or 0),
                r["id"] in live,
            )
            for r in rows
        ]
        repairs = reconcile.plan(
            ours,
            github_status=status,
            github_queued=queued,
            envs=envs,
            now=now,
            runner_timeout_s=self.s.runner_timeout_s,
        )
        for rep in repairs:
            log.info(
                "reconcile: %s job=%s env=%s: %s",
                rep.kind,
                rep.job_id or "-",
                rep.env or "-",
                rep.reason,
            )
            self._repair(rep, status)
        self.store.prune_deliveries(max(2 * self.s.max_age_s, 86400))
        self._wake.set()
        return repairs

    def _our_envs(self) -> list[str]:
        """ENVs this service made: named gh-JOB-ATTEMPT and with a GitHub origin whose runner
        is ours (a user's own `gh-1-1` made by hand is left alone)."""
        return [
            e["name"]
            for e in self.tt.get("/v1/envs")
            if (e.get("origin") or {}).get("kind") == "github"
            and parse_runner_name((e.get("origin") or {}).get("runner"))
        ]

    def _repair(self, rep: reconcile.Repair, status: dict[int, str | None]) -> None:
        if rep.kind == "adopt":
            q = rep.data
            payload = {
                "repository": {"full_name": q["repo"]},
                "installation": {"id": q["installation_id"]},
            }
            job = {**q, "status": "queued"}
            m = parse_labels(q["labels"], self.s.marker)
            self._on_queued(job, payload, m.target.os_prefix if m.target else "", m.reason)
        elif rep.kind == "requeue":
            self.store.apply(rep.job_id, Event.REQUEUE, reason=rep.reason)
        elif rep.kind == "complete":
            self.store.apply(rep.job_id, Event.COMPLETED, gh_status=status.get(rep.job_id) or "")
            self._cleanup(rep.job_id)
        elif rep.kind == "cleanup":
            self._cleanup(rep.job_id)
        elif rep.kind == "retry":
            row = self.store.get(rep.job_id)
            if row and (not row["env"] or self._delete_env(row["env"])):
                self._remove_runner(row)
                self._fail(rep.job_id, rep.reason, retry_delay(int(row["attempt"])))
        elif rep.kind == "delete_env" and not self._owned_now(rep.env):
            self._delete_env(rep.env)

    def _owned_now(self, env: str) -> bool:
        """Whether a job owns env now: the plan's snapshot may predate a job handed to TT CI's
        queue (its row names the ENV before the ENV is asked for)."""
        ids = parse_env_name(env)
        row = self.store.get(ids[0]) if ids else None
        return row is not None and row["env"] == env and State(row["state"]) in OWNS_VM
