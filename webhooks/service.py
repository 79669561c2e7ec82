"""The service: takes verified deliveries (fast), provisions VMs with JIT runners (worker
threads), cleans up, and reconciles with GitHub (a loop). One Service per process."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttci.client.scheduler import ApiError, Client
from ttci.model.errors import BadInput, TTError
from webhooks.core import reconcile
from webhooks.core.jobs import (
    ACTIVE,
    Event,
    State,
    env_name,
    parse_event,
    parse_runner_name,
    result_of,
    retry_delay,
    runner_name,
    staleness,
)
from webhooks.core.labels import jit_labels, parse_labels
from webhooks.github_api import GitHubAPI, GitHubError, JitRunner, RateLimited
from webhooks.metrics import Metrics
from webhooks.runner import STARTED_MARK, launch_request, tar_dir
from webhooks.store import JobStore

__all__ = ["Service", "Settings"]

log = logging.getLogger("webhooks")


@dataclass(frozen=True)
class Settings:
    marker: str = "tt"  # the label that says "a TT CI VM"
    max_age_s: float = 3600.0  # older events are refused as stale
    vm_cpus: float = 1.0
    vm_memory_mib: int = 1024
    vm_disk_gib: int = 0
    life_time: str = "6h"  # GitHub's job limit; the scheduler reaps an ENV after that
    runner_dir: str = "/opt/actions-runner"
    runner_push_dir: Path | None = None  # pushed into each VM at runner_dir before start
    jit_via: str = "env"  # env | argv
    max_total: int = 10  # VMs at once, all repositories
    max_per_owner: int = 5  # VMs at once per organisation/user
    reconcile_interval_s: float = 60.0
    runner_timeout_s: float = 300.0  # a started runner must take a job within this
    repos: tuple[str, ...] = field(default=())  # also reconciled when no webhook came yet


class Service:
    def __init__(self, settings: Settings, store: JobStore, gh: GitHubAPI, tt: Client) -> None:
        self.s = settings
        self.store = store
        self.gh = gh
        self.tt = tt
        self.metrics = Metrics()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: set[int] = set()
        self._live_lock = threading.Lock()
        self._cleanup_locks: dict[int, threading.Lock] = {}
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, reconcile_loop: bool = True) -> None:
        loops = [self._dispatch_loop] + ([self._reconcile_loop] if reconcile_loop else [])
        for fn in loops:
            t = threading.Thread(target=fn, name=fn.__name__, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the loops; VMs of running jobs stay (the reconciler of the next start owns them)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, fn: Callable[[int], None], jid: int) -> None:
        """A daemon thread per job task: a provisioning thread lives as long as its runner (it
        holds the agent stream that tells when run.sh exits), so a stopping service must not
        wait for them; the dispatcher's limits bound how many there are."""
        if not self._stop.is_set():
            threading.Thread(
                target=fn, args=(jid,), name=f"gh-{fn.__name__}-{jid}", daemon=True
            ).start()

    # -- the request path: decide and record, nothing slow -----------------------------------
    def handle_delivery(
        self, event: str, delivery: str, payload: Any
    ) -> tuple[int, dict[str, Any]]:
        """Record one verified delivery. Returns (HTTP status, body)."""
        if event == "ping":
            return 200, {"status": "pong"}
        if event != "workflow_job":
            self.metrics.deliveries.labels(event[:40], "ignored").inc()
            return 202, {"status": "ignored", "reason": f"event {event!r} is not handled"}
        try:
            action, job = parse_event(payload)
        except ValueError as e:
            self.metrics.deliveries.labels(event, "malformed").inc()
            return 400, {
                "error": f"malformed workflow_job delivery: {e}",
                "hint": "send GitHub's workflow_job payload unchanged",
            }
        with self.store.batch():  # one commit per delivery
            return self._record(event, delivery, action, job, payload)

    def _record(
        self, event: str, delivery: str, action: str, job: dict[str, Any], payload: Any
    ) -> tuple[int, dict[str, Any]]:
        first = self.store.first_delivery(delivery, event, action, job["id"])
        if first is not None:
            self.metrics.deliveries.labels(event, "replay").inc()
            log.warning("delivery %s was already received at %.0f: refused", delivery, first)
            return 409, {
                "error": f"delivery {delivery} was already received",
                "hint": "each X-GitHub-Delivery is handled once",
            }
        stale = staleness(action, job, _utcnow(), self.s.max_age_s)
        if stale:
            self.metrics.deliveries.labels(event, "stale").inc()
            self.store.set_outcome(delivery, "stale")
            log.warning("delivery %s for job %s is stale: %s", delivery, job["id"], stale)
            return 409, {
                "error": f"stale delivery: {stale}",
                "hint": "the reconciler picks up jobs GitHub still has queued",
            }
        outcome, body = self._on_job_event(action, job, payload)
        self.store.set_outcome(delivery, outcome)
        self.metrics.deliveries.labels(event, outcome).inc()
        return 202, {"status": outcome, **body}

    def _on_job_event(
        self, action: str, job: dict[str, Any], payload: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        match = parse_labels(job["labels"], self.s.marker)
        if not match.ours:
            return "ignored", {"reason": "the job's labels are not ours"}
        jid = int(job["id"])
        if action == "queued":
            return self._on_queued(
                job, payload, match.target.os_prefix if match.target else "", match.reason
            )
        if action == "in_progress":
            took = str(job.get("runner_name") or "")
            if self.store.get(jid) is None:
                self._insert(job, payload, "", State.IN_PROGRESS)
            self.store.apply(jid, Event.IN_PROGRESS, took_runner=took, gh_status="in_progress")
            owner = parse_runner_name(took)
            if owner and owner[0] != jid:
                log.info(
                    "job %s was taken by runner %s (made for job %s)",
                    jid,
                    took,
                    owner[0],
                    extra={"job": jid},
                )
            log.info("job %s in progress on runner %s", jid, took or "?", extra={"job": jid})
            return "in_progress", {"job": jid}
        if action == "completed":
            self._on_completed(job, payload)
            return "completed", {"job": jid}
        return "ignored", {"reason": f"action {action!r} needs nothing from us"}

    def _insert(
        self,
        job: dict[str, Any],
        payload: dict[str, Any],
        os_prefix: str,
        state: State,
        reason: str = "",
    ) -> bool:
        repo = payload["repository"]["full_name"]
        inst = (payload.get("installation") or {}).get("id")
        return self.store.insert(
            {
                "id": int(job["id"]),
                "repo": repo,
                "owner": repo.split("/", 1)[0],
                "installation_id": int(inst) if isinstance(inst, int) else None,
                "run_id": job.get("run_id"),
                "name": str(job.get("name") or ""),
                "html_url": str(job.get("html_url") or ""),
                "labels": job["labels"],
                "os_prefix": os_prefix,
                "state": state.value,
                "reason": reason,
                "gh_status": str(job.get("status") or ""),
            }
        )

    def _on_queued(
        self, job: dict[str, Any], payload: dict[str, Any], os_prefix: str, reason: str
    ) -> tuple[str, dict[str, Any]]:
        jid = int(job["id"])
        if reason:
            if self._insert(job, payload, "", State.UNSERVABLE, reason):
                self.metrics.jobs.labels("unservable").inc()
                log.warning("job %s cannot be served: %s", jid, reason, extra={"job": jid})
            return "unservable", {"job": jid, "reason": reason}
        if not self._insert(job, payload, os_prefix, State.PENDING):
            return "known", {"job": jid}
        log.info(
            "job %s queued for %s (%s)", jid, os_prefix, job.get("html_url", ""), extra={"job": jid}
        )
        self._wake.set()
        return "queued", {"job": jid, "os_prefix": os_prefix}

    def _on_completed(self, job: dict[str, Any], payload: dict[str, Any]) -> None:
        jid = int(job["id"])
        took = str(job.get("runner_name") or "")
        conclusion = str(job.get("conclusion") or "")
        if self.store.get(jid) is None:
            self._insert(job, payload, "", State.DONE)
        ran_on = parse_runner_name(took)
        if ran_on and ran_on[0] != jid:
            # Another job's runner ran this one: that runner's VM is the one that is done.
            self.store.update(jid, gh_status="completed", conclusion=conclusion, took_runner=took)
            other = self.store.get(ran_on[0])
            if other and other["runner_name"] == took:
                self.store.apply(ran_on[0], Event.RUNNER_EXITED, reason=f"ran job {jid}")
                self._submit_cleanup(ran_on[0])
            mine = self.store.get(jid)
            if mine and State(mine["state"]) not in ACTIVE:
                self.store.apply(jid, Event.COMPLETED)
        else:
            self.store.apply(
                jid, Event.COMPLETED, gh_status="completed", conclusion=conclusion, took_runner=took
            )
            self._submit_cleanup(jid)
        log.info("job %s completed (%s)", jid, conclusion or "?", extra={"job": jid})

    # -- dispatch: pending jobs get VMs within the limits -------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self.dispatch_once()
            except Exception:
                log.exception("dispatch failed; retrying in a second")
            # A burst of deliveries wakes us once per delivery: at most 20 passes a second, so
            # the request threads keep the lock (a lone job still starts at once).
            self._stop.wait(0.05)

    def dispatch_once(self) -> int:
        """Start provisioning pending jobs, oldest first, within the pool and owner limits."""
        started = 0
        now = time.time()
        total, per = self.store.active_counts()
        self.metrics.active.set(total)
        if total >= self.s.max_total:  # nothing can start: say so on every waiting job at once
            why = f"waiting: the pool's limit of {self.s.max_total} VMs is reached"
            if self.store.mark_waiting(now, why):
                log.info("jobs %s", why)
            return 0
        for job in self.store.claim_pending(now):
            owner = job["owner"]
            if total >= self.s.max_total or per.get(owner, 0) >= self.s.max_per_owner:
                why = (
                    f"waiting: the pool's limit of {self.s.max_total} VMs is reached"
                    if total >= self.s.max_total
                    else f"waiting: {owner} has its limit of {self.s.max_per_owner} VMs"
                )
                if job["reason"] != why:
                    self.store.update(job["id"], reason=why)
                    log.info("job %s %s", job["id"], why, extra={"job": job["id"]})
                continue
            attempt = int(job["attempt"]) + 1
            _, new = self.store.apply(
                job["id"],
                Event.PROVISION,
                attempt=attempt,
                reason="",
                runner_name=runner_name(job["id"], attempt),
                env=env_name(job["id"], attempt),
                vm_ready_at=None,
                runner_started_at=None,
                runner_id=None,
            )
            if new is None:
                continue
            total += 1
            per[owner] = per.get(owner, 0) + 1
            with self._live_lock:
                self._live.add(job["id"])
            self._spawn(self._provision_guarded, job["id"])
            started += 1
        self.metrics.active.set(total)
        return started

    def _provision_guarded(self, jid: int) -> None:
        try:
            self.provision(jid)
        except Exception as e:
            log.exception("job %s: provisioning crashed", jid, extra={"job": jid})
            self._fail(jid, f"internal error: {e!r}", retry_delay(1))
        finally:
            with self._live_lock:
                self._live.discard(jid)
            self._wake.set()

    def provision(self, jid: int) -> None:
        """Ask GitHub for a JIT runner while the VM boots, start the runner, wait for it."""
        job = self.store.get(jid)
        if job is None or job["state"] != State.PROVISIONING.value:
            return
        env, rname = job["env"], job["runner_name"]
        t0 = time.time()
        jit_box: dict[str, Any] = {}

        def get_jit() -> None:
            try:
                jit_box["jit"] = self._jit(job, rname)
            except Exception as e:
                jit_box["error"] = e

        jit_thread = threading.Thread(target=get_jit, daemon=True)
        jit_thread.start()
        try:
            vm_env = self.tt.create_env(self._env_request(job, env, rname))
        except BadInput as e:
            jit_thread.join()
            self._drop_jit(job, jit_box)
            self.store.update(jid, state=State.UNSERVABLE.value, reason=str(e), env="")
            self.metrics.jobs.labels("unservable").inc()
            log.warning("job %s cannot be served: %s", jid, e, extra={"job": jid})
            return
        except TTError as e:
            jit_thread.join()
            self._drop_jit(job, jit_box)
            self._delete_env(env)
            self._fail(
                jid, f"VM for {job['os_prefix']} failed: {e}", retry_delay(int(job["attempt"]))
            )
            return
        vms = vm_env.get("vms") or [{}]
        self.store.update(
            jid, vm_ready_at=time.time(), guest_boot_s=float(vms[0].get("guest_boot_s") or 0.0)
        )
        log.info("job %s: VM %s up in %.1f s", jid, env, time.time() - t0, extra={"job": jid})
        jit_thread.join()
        if "error" in jit_box:
            err = jit_box["error"]
            self._delete_env(env)
            delay = (
                err.retry_after
                if isinstance(err, RateLimited)
                else retry_delay(int(job["attempt"]))
            )
            self._fail(jid, f"JIT runner: {err}", delay)
            return
        jit: JitRunner = jit_box["jit"]
        self.store.update(jid, runner_id=jit.runner_id)
        now_row = self.store.get(jid)
        if now_row is None or now_row["state"] != State.PROVISIONING.value:
            # completed (or cancelled) while we booted
            self._cleanup(jid)
            return
        try:
            self._run_runner(jid, env, jit)
        except TTError as e:
            self._cleanup(jid)
            self._fail(jid, f"runner in {env}: {e}", retry_delay(int(job["attempt"])))
            return
        self._cleanup(jid)

    def _jit(self, job: dict[str, Any], rname: str) -> JitRunner:
        repo, inst = job["repo"], job["installation_id"]
        labels = jit_labels(job["labels"])
        try:
            return self.gh.create_jit_runner(repo, inst, rname, labels)
        except GitHubError as e:
            if e.status != 409:
                raise
        # A runner of that name exists (a previous try of ours): remove it and try once more.
        old = self.gh.find_runner(repo, inst, rname)
        if old is not None:
            self.gh.delete_runner(repo, inst, old)
        return self.gh.create_jit_runner(repo, inst, rname, labels)

    def _drop_jit(self, job: dict[str, Any], box: dict[str, Any]) -> None:
        jit = box.get("jit")
        if isinstance(jit, JitRunner):
            self._remove_runner({**job, "runner_id": jit.runner_id})

    def _env_request(self, job: dict[str, Any], env: str, rname: str) -> dict[str, Any]:
        return {
            "name": env,
            "os_prefix": job["os_prefix"],
            "cpus": self.s.vm_cpus,
            "memory_mib": self.s.vm_memory_mib,
            "disk_gib": self.s.vm_disk_gib,
            "life_time": self.s.life_time,
            "origin": {
                "kind": "github",
                "job": str(job["id"]),
                "url": job["html_url"] or f"https://github.com/{job['repo']}",
                "project": job["repo"],
                "runner": rname,
            },
        }

    def _run_runner(self, jid: int, env: str, jit: JitRunner) -> None:
        """Start run.sh in the VM; returns when the runner process has exited."""
        bundle = tar_dir(self.s.runner_push_dir) if self.s.runner_push_dir else None
        req = launch_request(self.s.runner_dir, self.s.jit_via, jit.encoded_jit_config, bundle)
        self.store.update(jid, launched_at=time.time())
        tail: list[str] = []
        code: Any = None
        for ev in self.tt.run(env, req):
            kind = ev.get("event")
            if kind in ("stdout", "stderr"):
                text = base64.b64decode(ev.get("data", "")).decode(errors="replace")
                if STARTED_MARK in text and kind == "stderr":
                    self.store.apply(jid, Event.RUNNER_STARTED, runner_started_at=time.time())
                    log.info(
                        "job %s: runner %s started in %s", jid, jit.name, env, extra={"job": jid}
                    )
                tail = (tail + text.splitlines())[-20:]
            elif kind == "exit":
                code = ev.get("code")
            elif kind == "error":
                code = ev.get("message")
        why = f"the runner exited ({code})"
        if code not in (0, None) and tail:
            log.info(
                "job %s: runner output ended with: %s",
                jid,
                " | ".join(tail[-3:]),
                extra={"job": jid},
            )
        self.store.apply(jid, Event.RUNNER_EXITED, reason=why)
        log.info("job %s: %s", jid, why, extra={"job": jid})

    # -- failures and clean-up ---------------------------------------------------------------
    def _fail(self, jid: int, why: str, delay: float) -> None:
        """A try failed: the job goes back to pending and is tried again after delay."""
        _, new = self.store.apply(
            jid, Event.VM_FAILED, reason=why, not_before=time.time() + delay, env=""
        )
        self.metrics.jobs.labels("retry").inc()
        if new is not None:
            log.warning("job %s: %s; retrying in %.0f s", jid, why, delay, extra={"job": jid})

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
            if job["env"] and not self._delete_env(job["env"]):
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
                self.tt.report_result(job["env"], result_of(job["conclusion"]))
            except TTError as e:
                log.warning("job %s: result not reported: %s", job["id"], e)

    def _delete_env(self, env: str) -> bool:
        try:
            self.tt.delete_env(env)
        except ApiError as e:
            if e.status != 404:
                log.warning("ENV %s not deleted: %s", env, e, extra={"env": env})
                return False
        except TTError as e:
            log.warning("ENV %s not deleted: %s", env, e, extra={"env": env})
            return False
        return True

    # -- reconciliation ----------------------------------------------------------------------
    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.s.reconcile_interval_s):
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
        # only ENVs this service made: named gh-JOB-ATTEMPT and with a GitHub origin whose
        # runner is ours (a user's own `gh-1-1` made by hand is left alone)
        envs = [
            e["name"]
            for e in self.tt.get("/v1/envs")
            if (e.get("origin") or {}).get("kind") == "github"
            and parse_runner_name((e.get("origin") or {}).get("runner"))
        ]
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
        elif rep.kind == "delete_env":
            self._delete_env(rep.env)

    # -- views for operators -----------------------------------------------------------------
    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """Jobs for operators: state, reason, runner, VM and the times (epoch seconds) it was
        recorded, its VM was up, run.sh was launched and started. No secret is stored."""
        hidden = ("owner", "installation_id", "run_id", "not_before", "state_since")
        return [{k: v for k, v in r.items() if k not in hidden} for r in self.store.recent(state)]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
