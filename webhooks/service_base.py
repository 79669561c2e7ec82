"""The GitHub service's settings and shared state; deliveries, provisioning and cleanup
(webhooks/deliveries.py, provisioning.py, cleanup.py) build on ServiceBase."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttci.client.scheduler import Client
from ttci.infra.sql_leases import Leases
from ttci.model.cache import CacheSpec
from ttci.model.egress import EgressRule
from webhooks.core.egress import RepoEgress
from webhooks.github_api import GitHubAPI
from webhooks.metrics import Metrics
from webhooks.store import JobStore

__all__ = ["LEASE", "ServiceBase", "Settings", "utcnow"]

log = logging.getLogger("webhooks")
LEASE = "github"  # the dispatcher and the reconciler run on its holder only


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
    max_waiting: int = 8  # jobs waiting in TT CI's admission queue at once (webhooks/core/queueing)
    reconcile_interval_s: float = 60.0
    runner_timeout_s: float = 300.0  # a started runner must take a job within this
    repos: tuple[str, ...] = field(default=())  # also reconciled when no webhook came yet
    allow_egress: tuple[EgressRule, ...] = ()  # every job's VM (webhooks/core/egress.py)
    repo_egress: Mapping[str, RepoEgress] = field(default_factory=dict, hash=False)
    repo_cache: Mapping[str, CacheSpec] = field(default_factory=dict, hash=False)  # core/caches


class ServiceBase:
    def __init__(self, settings: Settings, store: JobStore, gh: GitHubAPI, tt: Client) -> None:
        self.s = settings
        self.store = store
        self.gh = gh
        self.tt = tt
        self.metrics = Metrics()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: set[int] = set()
        self._in_queue: dict[int, str] = {}  # job -> repository: waiting in TT CI's queue
        self._stale_checks = threading.BoundedSemaphore(4)  # GitHub look-ups for old deliveries
        self._live_lock = threading.Lock()
        self._cleanup_locks: dict[int, threading.Lock] = {}
        self._threads: list[threading.Thread] = []
        # Replicas on one database: the dispatcher and the reconciler run where this lease is.
        self.leases = Leases(store.store, (LEASE,))

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, reconcile_loop: bool = True) -> None:
        self.leases.start()
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
        self.leases.stop()

    def _spawn(self, fn: Callable[[int], None], jid: int) -> None:
        """A daemon thread per job task: a provisioning thread lives as long as its runner (it
        holds the agent stream that tells when run.sh exits), so a stopping service must not
        wait for them. The dispatcher bounds how many wait in TT CI's queue (--max-waiting);
        the others run a VM each, so the cloud's capacity bounds them."""
        if not self._stop.is_set():
            threading.Thread(
                target=fn, args=(jid,), name=f"gh-{fn.__name__}-{jid}", daemon=True
            ).start()

    # -- what each part offers the others (defined in deliveries, provisioning, cleanup) ------
    def _dispatch_loop(self) -> None:
        raise NotImplementedError  # provisioning.Provisioning

    def _fail(self, jid: int, why: str, delay: float) -> None:
        raise NotImplementedError  # provisioning.Provisioning

    def _on_queued(
        self, job: dict[str, Any], payload: dict[str, Any], os_prefix: str, reason: str
    ) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError  # deliveries.Deliveries

    def _reconcile_loop(self) -> None:
        raise NotImplementedError  # cleanup.Cleanup

    def _submit_cleanup(self, jid: int) -> None:
        raise NotImplementedError  # cleanup.Cleanup

    def _cleanup(self, jid: int) -> None:
        raise NotImplementedError  # cleanup.Cleanup

    def _remove_runner(self, job: dict[str, Any]) -> None:
        raise NotImplementedError  # cleanup.Cleanup

    def _delete_env(self, env: str) -> bool:
        raise NotImplementedError  # cleanup.Cleanup

    # -- views for operators -----------------------------------------------------------------
    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """Jobs for operators: state, reason, runner, VM and the times (epoch seconds) it was
        recorded, its VM was up, run.sh was launched and started. No secret is stored."""
        hidden = ("owner", "installation_id", "run_id", "not_before", "state_since")
        return [{k: v for k, v in r.items() if k not in hidden} for r in self.store.recent(state)]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
