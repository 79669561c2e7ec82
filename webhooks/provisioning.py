"""Provisioning a job: the dispatcher hands jobs to TT CI's admission queue; when the scheduler
grants the capacity, the JIT runner is asked for while the VM boots; run.sh started and watched."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ttci.model.errors import BadInput, TTError
from ttci.wire.commands import EventKind
from ttci.wire.envs import EnvRequest, parse_duration
from ttci.wire.queue import QueueInfo, WaitOptions
from webhooks.core.caches import job_cache
from webhooks.core.egress import job_egress
from webhooks.core.jobs import (
    Event,
    State,
    env_name,
    retry_delay,
    runner_name,
)
from webhooks.core.labels import jit_labels
from webhooks.core.queueing import (
    Candidate,
    after_stream_end,
    pick_to_submit,
    queue_reason,
    waiting_reason,
)
from webhooks.github_api import GitHubError, JitRunner, RateLimited
from webhooks.runner import STARTED_MARK, launch_request, tar_dir
from webhooks.service_base import LEASE, ServiceBase

__all__ = ["Provisioning"]

log = logging.getLogger("webhooks")
WAIT = WaitOptions(wait=True)  # as long as it takes: GitHub's `completed` ends a wait


class _Jit:
    """The attempt's one JIT runner: asked for when the capacity is granted, in a thread of its
    own so that it overlaps the VM's boot; never asked for a job that only waited."""

    def __init__(self, ask: Callable[[], JitRunner]) -> None:
        self._ask = ask
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.runner: JitRunner | None = None
        self.error: Exception | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gh-jit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self.runner = self._ask()
        except Exception as e:
            self.error = e

    def join(self) -> None:
        with self._lock:
            t = self._thread
        if t is not None:
            t.join()


class Provisioning(ServiceBase):
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if not self.leases.held(LEASE):  # another replica dispatches
                continue
            try:
                self.dispatch_once()
            except Exception:
                log.exception("dispatch failed; retrying in a second")
            # A burst of deliveries wakes us once per delivery: at most 20 passes a second, so
            # the request threads keep the lock (a lone job still starts at once).
            self._stop.wait(0.05)

    def dispatch_once(self) -> int:
        """Hand pending jobs to TT CI's admission queue: at most --max-waiting of ours wait
        there at once, the free places shared out between repositories (core/queueing.py).
        Returns how many were handed over."""
        pending = self.store.claim_pending(time.time())
        with self._live_lock:
            waiting = dict(self._in_queue)
        self.metrics.active.set(self.store.active_counts()[0])
        self.metrics.in_queue.set(len(waiting))
        if not pending:
            return 0
        chosen = pick_to_submit(
            [Candidate(j["id"], j["repo"], float(j["queued_at"] or 0)) for j in pending],
            Counter(waiting.values()),
            self.s.max_waiting - len(waiting),
        )
        why = waiting_reason(self.s.max_waiting)
        with self.store.batch():
            for job in pending:
                if job["id"] not in chosen and job["reason"] != why:
                    self.store.update(job["id"], reason=why)
        rows = {j["id"]: j for j in pending}
        return sum(self._submit(rows[jid]) for jid in chosen)

    def _submit(self, job: dict[str, Any]) -> bool:
        """Start the job's attempt: a thread that waits in TT CI's queue for its VM."""
        jid = int(job["id"])
        attempt = int(job["attempt"]) + 1
        _, new = self.store.apply(
            jid,
            Event.PROVISION,
            attempt=attempt,
            reason="handed to TT CI's admission queue",
            runner_name=runner_name(jid, attempt),
            env=env_name(jid, attempt),
            vm_ready_at=None,
            runner_started_at=None,
            runner_id=None,
        )
        if new is None:
            return False
        with self._live_lock:
            self._live.add(jid)
            self._in_queue[jid] = str(job["repo"])
        self._spawn(self._provision_guarded, jid)
        return True

    def _provision_guarded(self, jid: int) -> None:
        try:
            self.provision(jid)
        except Exception as e:
            log.exception("job %s: provisioning crashed", jid, extra={"job": jid})
            self._fail(jid, f"internal error: {e!r}", retry_delay(1))
        finally:
            with self._live_lock:
                self._live.discard(jid)
                self._in_queue.pop(jid, None)
            self._wake.set()

    def provision(self, jid: int) -> None:
        """Wait in TT CI's queue for the job's VM; once granted, ask GitHub for the JIT runner
        while the VM boots; start the runner and wait for it."""
        job = self.store.get(jid)
        if job is None or job["state"] != State.PROVISIONING.value:
            return
        env = job["env"]
        t0 = time.time()
        jit = _Jit(lambda: self._jit(job, job["runner_name"]))
        vm_env = self._create_vm(jid, job, jit)
        if vm_env is None:
            return
        vms = vm_env.get("vms") or [{}]
        self.store.update(
            jid, vm_ready_at=time.time(), guest_boot_s=float(vms[0].get("guest_boot_s") or 0.0)
        )
        log.info("job %s: VM %s up in %.1f s", jid, env, time.time() - t0, extra={"job": jid})
        if self._still_provisioning(jid):
            jit.start()  # asked at the grant already, unless a broken stream missed that event
        jit.join()
        if jit.runner is not None:
            self.store.update(jid, runner_id=jit.runner.runner_id)
        if not self._still_provisioning(jid):  # completed, cancelled or taken while we booted
            self._cleanup(jid)
            return
        if jit.runner is None:
            err = jit.error or TTError("no JIT runner")
            self._delete_env(env)
            delay = (
                err.retry_after
                if isinstance(err, RateLimited)
                else retry_delay(int(job["attempt"]))
            )
            self._fail(jid, f"JIT runner: {err}", delay)
            return
        try:
            self._run_runner(jid, env, jit.runner)
        except TTError as e:
            self._cleanup(jid)
            self._fail(jid, f"runner in {env}: {e}", retry_delay(int(job["attempt"])))
            return
        self._cleanup(jid)

    def _still_provisioning(self, jid: int) -> bool:
        row = self.store.get(jid)
        return row is not None and row["state"] == State.PROVISIONING.value

    def _create_vm(self, jid: int, job: dict[str, Any], jit: _Jit) -> dict[str, Any] | None:
        """The job's ENV, after its wait in TT CI's queue; None when it could not be made (the
        job is then failed, cancelled or unservable, and a JIT runner got meanwhile is removed)."""
        env = job["env"]
        shown = [str(job["reason"])]

        def on_queued(info: QueueInfo) -> None:
            why = queue_reason(info)
            if why != shown[0] and self._still_provisioning(jid):
                shown[0] = why
                self.store.update(jid, reason=why)

        def on_granted(waited_s: float) -> None:
            with self._live_lock:
                self._in_queue.pop(jid, None)
            self._wake.set()  # a place in TT CI's queue is free for the next job
            if self._still_provisioning(jid):
                jit.start()  # once per attempt, and only now: a busy cloud costs no runner
                self.store.update(jid, reason=f"granted after {waited_s:.0f} s; VM booting")
            log.info("job %s: granted after %.1f s", jid, waited_s, extra={"job": jid})

        try:
            return self.tt.create_env_progress(
                self._env_request(job, env, job["runner_name"]),
                lambda vm: None,
                on_queued=on_queued,
                on_granted=on_granted,
                wait=WAIT,
            )
        except BadInput as e:
            jit.join()
            self._drop_jit(job, jit)
            self.store.update(jid, state=State.UNSERVABLE.value, reason=str(e), env="")
            self.metrics.jobs.labels("unservable").inc()
            log.warning("job %s cannot be served: %s", jid, e, extra={"job": jid})
        except TTError as e:
            jit.join()
            self._drop_jit(job, jit)
            self._env_failed(jid, job, e)
        finally:
            with self._live_lock:
                self._in_queue.pop(jid, None)
        return None

    def _env_failed(self, jid: int, job: dict[str, Any], e: TTError) -> None:
        row = self.store.get(jid)
        if after_stream_end(State(row["state"]) if row else None) == "cancelled":
            # a `completed` webhook (or the reconciler) withdrew the request: nothing to retry
            self.metrics.jobs.labels("cancelled").inc()
            log.info("job %s: its ENV request ended: %s", jid, e, extra={"job": jid})
            self._cleanup(jid)
            return
        self._delete_env(job["env"])
        self._fail(jid, f"VM for {job['os_prefix']} failed: {e}", retry_delay(int(job["attempt"])))

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

    def _drop_jit(self, job: dict[str, Any], jit: _Jit) -> None:
        if jit.runner is not None:
            self._remove_runner({**job, "runner_id": jit.runner.runner_id})

    def _env_request(self, job: dict[str, Any], env: str, rname: str) -> EnvRequest:
        allow, audit = job_egress(job["repo"], self.s.allow_egress, self.s.repo_egress)
        return EnvRequest(
            name=env,
            os_prefix=job["os_prefix"],
            cpus=self.s.vm_cpus,
            memory_mib=self.s.vm_memory_mib,
            disk_gib=self.s.vm_disk_gib,
            life_s=parse_duration(self.s.life_time),
            origin={
                "kind": "github",
                "job": str(job["id"]),
                "url": job["html_url"] or f"https://github.com/{job['repo']}",
                "project": job["repo"],
                "runner": rname,
            },
            allow_egress=allow,
            egress_audit=audit,
            cache=job_cache(job["repo"], self.s.repo_cache),
        )

    def _run_runner(self, jid: int, env: str, jit: JitRunner) -> None:
        """Start run.sh in the VM; returns when the runner process has exited."""
        bundle = tar_dir(self.s.runner_push_dir) if self.s.runner_push_dir else None
        req = launch_request(self.s.runner_dir, self.s.jit_via, jit.encoded_jit_config, bundle)
        self.store.update(jid, launched_at=time.time())
        tail: list[str] = []
        code: int | str | None = None
        for ev in self.tt.exec(env, req):
            if ev.kind in (EventKind.STDOUT, EventKind.STDERR):
                text = ev.data.decode(errors="replace")
                if STARTED_MARK in text and ev.kind is EventKind.STDERR:
                    self.store.apply(jid, Event.RUNNER_STARTED, runner_started_at=time.time())
                    log.info(
                        "job %s: runner %s started in %s", jid, jit.name, env, extra={"job": jid}
                    )
                tail = (tail + text.splitlines())[-20:]
            elif ev.status is not None:
                code = ev.status.code
            elif ev.kind is EventKind.ERROR:
                code = ev.message
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
