"""Provisioning a job: the dispatcher, a VM and a JIT runner at once, run.sh started and watched."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ttci.model.errors import BadInput, TTError
from ttci.wire.commands import EventKind
from ttci.wire.envs import EnvRequest, parse_duration
from webhooks.core.jobs import (
    Event,
    State,
    env_name,
    retry_delay,
    runner_name,
)
from webhooks.core.labels import jit_labels
from webhooks.github_api import GitHubError, JitRunner, RateLimited
from webhooks.runner import STARTED_MARK, launch_request, tar_dir
from webhooks.service_base import ServiceBase

__all__ = ["Provisioning"]

log = logging.getLogger("webhooks")


class Provisioning(ServiceBase):
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
        vm_env = self._create_vm(jid, job, env, jit_thread, jit_box)
        if vm_env is None:
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

    def _create_vm(
        self,
        jid: int,
        job: dict[str, Any],
        env: str,
        jit_thread: threading.Thread,
        jit_box: dict[str, Any],
    ) -> dict[str, Any] | None:
        """The job's ENV, or None when it could not be made (the job is then failed or marked
        unservable, and a JIT runner obtained meanwhile is removed again)."""
        try:
            return self.tt.create_env(self._env_request(job, env, job["runner_name"]))
        except BadInput as e:
            jit_thread.join()
            self._drop_jit(job, jit_box)
            self.store.update(jid, state=State.UNSERVABLE.value, reason=str(e), env="")
            self.metrics.jobs.labels("unservable").inc()
            log.warning("job %s cannot be served: %s", jid, e, extra={"job": jid})
        except TTError as e:
            jit_thread.join()
            self._drop_jit(job, jit_box)
            self._delete_env(env)
            self._fail(
                jid, f"VM for {job['os_prefix']} failed: {e}", retry_delay(int(job["attempt"]))
            )
        return None

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

    def _env_request(self, job: dict[str, Any], env: str, rname: str) -> EnvRequest:
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
