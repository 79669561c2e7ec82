"""The request path of the GitHub service: verify, decide and record a delivery; nothing slow."""

from __future__ import annotations

import logging
from typing import Any

from webhooks.core.jobs import (
    ACTIVE,
    Event,
    State,
    parse_event,
    parse_runner_name,
    staleness,
)
from webhooks.core.labels import parse_labels
from webhooks.core.queueing import STALE, STALE_FINAL, stale_verdict
from webhooks.github_api import GitHubError
from webhooks.service_base import ServiceBase, utcnow

__all__ = ["Deliveries"]

log = logging.getLogger("webhooks")


class Deliveries(ServiceBase):
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
            status, body, stale = self._record(event, delivery, action, job, payload)
        if stale is None:
            return status, body
        return self._serve_if_still_queued(
            event, delivery, action, job, payload=payload, stale=stale
        )

    def _record(
        self, event: str, delivery: str, action: str, job: dict[str, Any], payload: Any
    ) -> tuple[int, dict[str, Any], str | None]:
        """(status, body, None), or (0, {}, why stale) when GitHub is to be asked first."""
        first = self.store.first_delivery(delivery, event, action, job["id"])
        if first is not None:
            self.metrics.deliveries.labels(event, "replay").inc()
            log.warning("delivery %s was already received at %.0f: refused", delivery, first)
            return (
                409,
                {
                    "error": f"delivery {delivery} was already received",
                    "hint": "each X-GitHub-Delivery is handled once",
                },
                None,
            )
        stale = staleness(action, job, utcnow(), self.s.max_age_s)
        if stale:
            if self._worth_asking(action, job):
                return 0, {}, stale
            return (*self._refuse_stale(event, delivery, job, stale, STALE), None)
        outcome, body = self._on_job_event(action, job, payload)
        self.store.set_outcome(delivery, outcome)
        self.metrics.deliveries.labels(event, outcome).inc()
        return 202, {"status": outcome, **body}, None

    # -- old deliveries: served when GitHub still has the job queued ----------------------------
    def _worth_asking(self, action: str, job: dict[str, Any]) -> bool:
        """A stale `queued` for one of our jobs that we never recorded: GitHub is asked."""
        return (
            action == "queued"
            and parse_labels(job["labels"], self.s.marker).ours
            and self.store.get(int(job["id"])) is None
        )

    def _refuse_stale(
        self, event: str, delivery: str, job: dict[str, Any], why: str, outcome: str
    ) -> tuple[int, dict[str, Any]]:
        self.metrics.deliveries.labels(event, "stale").inc()
        self.store.set_outcome(delivery, outcome)
        log.warning("delivery %s for job %s is stale: %s", delivery, job["id"], why)
        hint = (
            "redeliver it: GitHub is asked again"
            if outcome == STALE
            else "the reconciler picks up jobs GitHub still has queued"
        )
        return 409, {"error": f"stale delivery: {why}", "hint": hint}

    def _serve_if_still_queued(
        self,
        event: str,
        delivery: str,
        action: str,
        job: dict[str, Any],
        *,
        payload: dict[str, Any],
        stale: str,
    ) -> tuple[int, dict[str, Any]]:
        """Ask GitHub (outside the store's lock) whether the job of a stale delivery is still
        queued: then it is served, else refused for good (a redelivery is a replay)."""
        repo = payload["repository"]["full_name"]
        inst = (payload.get("installation") or {}).get("id")
        if not self._stale_checks.acquire(blocking=False):
            with self.store.batch():
                why = f"{stale}; GitHub is being asked about other old deliveries"
                return self._refuse_stale(event, delivery, job, why, STALE)
        try:
            gh_status = self.gh.job_status(repo, inst if isinstance(inst, int) else None, job["id"])
        except GitHubError as e:
            with self.store.batch():
                why = f"{stale}; GitHub could not be asked: {e.message}"
                return self._refuse_stale(event, delivery, job, why, STALE)
        finally:
            self._stale_checks.release()
        serve, why = stale_verdict(gh_status)
        with self.store.batch():
            if not serve:
                return self._refuse_stale(event, delivery, job, f"{stale}; {why}", STALE_FINAL)
            outcome, body = self._on_job_event(action, job, payload)
            self.store.set_outcome(delivery, outcome)
        self.metrics.deliveries.labels(event, outcome).inc()
        log.info("delivery %s is old (%s) but served: %s", delivery, stale, why)
        return 202, {"status": outcome, **body, "note": f"old delivery served: {why}"}

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
            old, _ = self.store.apply(
                jid, Event.IN_PROGRESS, took_runner=took, gh_status="in_progress"
            )
            with self._live_lock:
                waits = jid in self._in_queue
            if old is State.PROVISIONING and waits:
                # another runner took it while its ENV request waits in TT CI: withdraw that
                self._submit_cleanup(jid)
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
