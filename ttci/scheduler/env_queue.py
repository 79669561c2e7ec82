"""The admission queue: every ENV request waits its turn instead of failing when the cloud is
busy, and is granted by the dispatcher as soon as capacity frees.

A request is checked at once (its images exist, the whole ENV could ever fit the pool: else it
is refused with the reason), then recorded as a queued ENV with a queue row (both in SQLite,
so a restart keeps the queue and its order). The dispatcher (ttci.scheduler.planning.admission
decides) grants requests in order of priority, fair share and age: it places the VMs, records
them, and boots the ENV in a worker thread. It runs when capacity may have freed (an ENV
deleted, a VM failed, a host back or undrained), when a request arrives, and every half second
while anything waits. Clients watch an ENV's progress: `queued` events with their position,
then `granted`, `vm` per VM, and `ready` or `error`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ttci.model.errors import BadInput, TTError
from ttci.model.resources import Resources
from ttci.scheduler import admission_store as qs
from ttci.scheduler.core import EnvBusy, EnvExists, EnvNotFound
from ttci.scheduler.env_create import EnvCreation, request_from_json
from ttci.scheduler.planning.admission import (
    IMPOSSIBLE,
    QueuedRequest,
    Waiting,
    feasibility,
    next_to_place,
    project_key,
)
from ttci.scheduler.planning.placement import NoPlacement, place
from ttci.scheduler.users import User, check_env_name
from ttci.wire.api import ErrorBody
from ttci.wire.envs import EnvEvent, EnvRequest
from ttci.wire.queue import QueueInfo, WaitOptions

__all__ = ["EnvQueue", "QueueTimeout", "QueuedRefused", "status_of"]

log = logging.getLogger("ttci.scheduler.queue")
TICK_S = 0.5  # the dispatcher looks at least this often while requests wait
REPORT_EVERY_S = 5.0  # a watcher hears its position at least this often
WAIT = WaitOptions()  # the default: wait as long as it takes
NOTIFY_CHANNEL = "ttci_env"  # PostgreSQL: an ENV's name when it was granted, ready or failed


class QueueTimeout(TTError):
    """The request waited longer than its max_wait (it is no longer queued)."""


class QueuedRefused(TTError):
    """A queued request can no longer be served (e.g. the hosts with its image left)."""


class EnvQueue(EnvCreation):
    # -- submitting -----------------------------------------------------------------------
    def submit_env(self, req: EnvRequest, user: User, opts: WaitOptions = WAIT) -> None:
        """Queue the ENV (or refuse it with the reason if it could never fit the pool).

        Raises:
            BadInput: no image matches. NoPlacement: too big for the pool, or (wait false)
            not placeable right now. EnvExists: the name is taken. NameReserved: a CI
            service's name (gl-N, gh-N-N) asked for by another user.
        """
        check_env_name(user, req.name)  # before anything else: a squatter learns nothing
        asks = self._asks(req, user)
        project = project_key(req.origin, user.name)
        kind = req.origin.get("kind", "cli")
        quotas = qs.load_quotas(self.store)
        qr = QueuedRequest(
            id=req.name,
            owner=user.name,
            project=project,
            kind=kind,
            asks=tuple(asks),
            enqueued_at=time.time(),
            priority=quotas.priority(user.name, project, kind),
        )
        if why := feasibility(qr, self._whole_pool()):
            raise NoPlacement(why, hint="ask for fewer or smaller VMs, or add hosts")
        deadline = None if opts.max_wait_s is None else qr.enqueued_at + opts.max_wait_s
        with self._placing(), self.store.lock:
            self._insert_env(req, user, project)
            qs.enqueue(self.store, qr, deadline)
        log.info("ENV %s queued (%d VMs, project %s)", req.name, qr.vm_count, project)
        granted = self.dispatch()
        # Another thread's dispatch may have granted it meanwhile: then it is not unqueued
        # here and goes on like any granted request (refusing it would orphan a booting ENV).
        if not opts.wait and req.name not in granted and self._unqueue(req.name):
            raise self._not_now(req)

    def _not_now(self, req: EnvRequest) -> NoPlacement:
        """Why a request that may not wait cannot start now (today's placement message)."""
        try:
            place(self._asks(req), self.pool.views(self._committed()))
        except NoPlacement as e:
            return e
        return NoPlacement(
            f"ENV {req.name} would have to wait: requests ahead of it hold the free capacity",
            hint="send wait: true (drop --no-wait) to queue behind them",
        )

    def _whole_pool(self) -> list[Any]:
        """Every known host (up or down, drained or not) at its full capacity: what a request
        could ever get."""
        totals = self._totals()
        return [
            dataclasses.replace(h, up=True, free=totals.get(h.id, h.free))
            for h in self.pool.views(self._committed())
        ]

    def _totals(self) -> dict[str, Resources]:
        out = {}
        for row in self.pool.rows():
            total = json.loads(row["info"] or "{}").get("total") or {}
            with contextlib.suppress(TypeError, ValueError):
                out[row["id"]] = Resources(
                    float(total.get("cpus", 0)),
                    int(total.get("memory_mib", 0)),
                    int(total.get("disk_gib", 0)),
                )
        return out

    # -- dispatching ----------------------------------------------------------------------
    def dispatch(self) -> set[str]:
        """Grant what can start now (booting each in a worker); the names granted."""
        with self._placing():
            waiting = qs.load_queue(self.store)
            if not waiting:
                self._waiting = {}
                return set()
            now = time.time()
            limits = qs.deadlines(self.store)
            waiting = [r for r in waiting if not self._expired(r, now, limits.get(r.id))]
            # A host that is down may come back: its requests wait for it (as for a drained one).
            hosts = [
                h if h.up else dataclasses.replace(h, up=True, draining=True)
                for h in self.pool.views(self._committed())
            ]
            decision = next_to_place(
                waiting,
                hosts,
                self._totals(),
                qs.load_quotas(self.store),
                qs.in_use(self.store),
                now=now,
            )
            by_id = {r.id: r for r in waiting}
            for g in decision.grants:
                self._grant(by_id[g.id], g.placement, now)
            before = self._waiting
            self._waiting = {w.id: w for w in decision.waiting if w.blocked_by != IMPOSSIBLE}
            self._decided_at = now
            self._share(before)
        for w in decision.waiting:
            if w.blocked_by == IMPOSSIBLE:
                self._end_queued(w.id, QueuedRefused(w.detail, hint="add hosts with its image"))
            elif _changed(before.get(w.id), w):
                self._publish(w.id, EnvEvent("queued", queue=self._info(w)))
        return {g.id for g in decision.grants}

    def _expired(self, r: QueuedRequest, now: float, deadline: float | None) -> bool:
        if deadline is None or now < deadline:
            return False
        self._end_queued(
            r.id,
            QueueTimeout(
                f"ENV {r.id} waited {now - r.enqueued_at:.0f} s for capacity, longer than its "
                "max_wait; it is no longer queued",
                hint="retry later, ask for less, or allow a longer --max-wait",
            ),
        )
        return True

    def _grant(self, r: QueuedRequest, placement: dict[str, str], now: float) -> None:
        """Record the placed VMs and boot the ENV in a worker. Holds the place mutex."""
        with self.store.lock:
            row = self.store.db.table("envs").get(r.id)
            req = request_from_json(json.loads(row["request"]))
            self._insert_vms(req, list(r.asks), placement, now - r.enqueued_at)
            qs.dequeue(self.store, r.id)
        user = User(r.owner, admin=False)
        log.info("ENV %s granted after %.1f s", r.id, now - r.enqueued_at)
        self._publish(r.id, EnvEvent("granted", waited_s=round(now - r.enqueued_at, 1)))
        threading.Thread(
            target=self._boot_granted, args=(req, user), name=f"boot-{r.id}", daemon=True
        ).start()

    def _boot_granted(self, req: EnvRequest, user: User) -> None:
        try:
            env = self.boot_env(
                req, user, progress=lambda vm: self._publish(req.name, EnvEvent("vm", vm))
            )
            self._publish(req.name, EnvEvent("ready", env=env), final=True)
        except Exception as e:  # reported to the watchers; the ENV was taken back
            err = e if isinstance(e, TTError) else TTError(repr(e))
            log.warning("ENV %s failed: %s", req.name, err.message)
            self._publish(req.name, _error_event(err), final=True)
        self.wake_dispatch()

    def _unqueue(self, name: str) -> bool:
        """Take a queued ENV out of the queue and forget it; True if it was still queued."""
        with self._placing():
            return self._unqueue_locked(name)

    def _end_queued(self, name: str, err: TTError) -> None:
        if self._unqueue_locked(name):
            log.warning("ENV %s left the queue: %s", name, err.message)
            self._publish(name, _error_event(err), final=True)

    def _unqueue_locked(self, name: str) -> bool:
        """_unqueue for callers that already hold the place mutex."""
        with self.store.lock:
            gone = qs.dequeue(self.store, name)
            if gone:
                self.store.db.table("envs").delete_where("name = ? and state = 'queued'", [name])
        self._waiting.pop(name, None)
        return gone

    def start_dispatcher(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                woken = self._dispatch_wake.wait(TICK_S)
                self._dispatch_wake.clear()
                # This replica's own events (an ENV deleted here, a request queued here) are
                # looked at here; the periodic pass runs on the dispatcher lease's holder only.
                if not woken and not self.leases.held("dispatcher"):
                    continue
                try:
                    self.dispatch()
                except Exception:  # the dispatcher must survive anything
                    log.exception("dispatcher failed")

        threading.Thread(target=loop, name="dispatcher", daemon=True).start()
        self.store.listen(NOTIFY_CHANNEL, self._poke)

    # -- watching ---------------------------------------------------------------------------
    def _publish(self, name: str, ev: EnvEvent, final: bool = False) -> None:
        with self._watch_lock:
            for q in self._watchers.get(name, []):
                with contextlib.suppress(queue.Full):
                    q.put_nowait(ev)
            if final:
                self._watchers.pop(name, None)
        if ev.kind in ("granted", "ready", "error"):  # watchers on other replicas look now
            with contextlib.suppress(TTError):
                self.store.notify(NOTIFY_CHANNEL, name)

    def _poke(self, name: str) -> None:
        """Another replica changed the ENV: its watchers here read its row now."""
        with self._watch_lock:
            for q in self._watchers.get(name, []):
                with contextlib.suppress(queue.Full):
                    q.put_nowait(None)

    def submit_and_watch(
        self, req: EnvRequest, user: User, opts: WaitOptions = WAIT
    ) -> Iterator[EnvEvent]:
        """submit_env, with the progress stream subscribed first so no event is missed (a
        request granted at once is granted inside submit_env). Raises what submit_env raises."""
        q = self._subscribe(req.name)
        try:
            self.submit_env(req, user, opts)
        except BaseException:
            self._unsubscribe(req.name, q)
            raise
        return self._watching(req.name, user, q, replay=False)

    def watch_env(self, name: str, user: User) -> Iterator[EnvEvent]:
        """The ENV's progress until it is ready or failed: queued (position), granted, vm,
        then ready or error. Attach at any time (e.g. again after a scheduler restart): an ENV
        already granted starts with a `granted` event. EnvNotFound at once if it is not there."""
        self._env_row(name, user)
        return self._watching(name, user, self._subscribe(name), replay=True)

    def _subscribe(self, name: str) -> queue.Queue[EnvEvent | None]:
        q: queue.Queue[EnvEvent | None] = queue.Queue(maxsize=10_000)
        with self._watch_lock:
            self._watchers.setdefault(name, []).append(q)
        return q

    def _unsubscribe(self, name: str, q: queue.Queue[EnvEvent | None]) -> None:
        with self._watch_lock:
            if q in self._watchers.get(name, []):
                self._watchers[name].remove(q)

    def _watching(
        self, name: str, user: User, q: queue.Queue[EnvEvent | None], replay: bool
    ) -> Iterator[EnvEvent]:
        try:
            if replay and self._state_of(name, user) in ("creating", "ready"):
                row = self._env_row(name, user)
                yield EnvEvent("granted", waited_s=float(row.get("wait_s") or 0.0))
            yield from self._follow(name, user, q)
        finally:
            self._unsubscribe(name, q)

    def _follow(self, name: str, user: User, q: queue.Queue[EnvEvent | None]) -> Iterator[EnvEvent]:
        last_sent = 0.0
        while True:
            try:
                ev = q.get(timeout=self._watch_poll_s)
            except queue.Empty:
                ev = None  # no news: its row says how it stands
            if ev is not None:
                yield ev
                last_sent = time.monotonic()
                if ev.final:
                    return
                continue
            state = self._state_of(name, user)
            if state is None:
                yield from _last_words(name, q)
                return
            if state == "ready":
                yield EnvEvent("ready", env=self.show_env(name, user))
                return
            if state == "failed":
                row = self._env_row(name, user)
                yield _error_event(TTError(f"ENV {name} failed: {row['error']}"))
                return
            if state == "queued" and time.monotonic() - last_sent >= REPORT_EVERY_S:
                self._refresh_waiting()
                w = self._waiting.get(name)
                if w is not None:
                    yield EnvEvent("queued", queue=self._info(w))
                    last_sent = time.monotonic()

    def _state_of(self, name: str, user: User) -> str | None:
        try:
            return str(self._env_row(name, user)["state"])
        except EnvNotFound:
            return None

    def create_env(
        self,
        req: EnvRequest,
        user: User,
        progress: Callable[[EnvEvent], None] | None = None,
        opts: WaitOptions = WAIT,
    ) -> dict[str, Any]:
        """Queue the ENV and wait until it is ready (all or nothing); progress hears every
        event. Raises what submit_env raises, or the TTError that failed it."""
        for ev in self.submit_and_watch(req, user, opts):
            if ev.env is not None:
                return dict(ev.env)
            if ev.error is not None:
                raise _raised(ev)
            if progress:
                progress(ev)
        raise TTError(f"ENV {req.name}: its progress ended without a result")

    # -- views and cancelling ---------------------------------------------------------------
    def _share(self, before: dict[str, Waiting]) -> None:
        """Tell the other replicas what the decision says, when it changed (one process on
        SQLite: nobody to tell)."""
        now = self._waiting
        if self.store.dialect == "sqlite" or (
            before.keys() == now.keys() and not any(_changed(before[k], w) for k, w in now.items())
        ):
            return
        qs.share_decision(self.store, self._decided_at, list(now.values()))

    def _refresh_waiting(self) -> None:
        """Take another replica's decision when it is newer than this one's."""
        if self.store.dialect == "sqlite":
            return
        shared = qs.shared_decision(self.store)
        if shared is not None and shared[0] > self._decided_at:
            self._decided_at, self._waiting = shared[0], {w.id: w for w in shared[1]}

    def _info(self, w: Waiting) -> QueueInfo:
        """The decision's view of a request, its wait counted up to now."""
        waited = w.waited_s + max(0.0, time.time() - self._decided_at)
        return QueueInfo(w.position, w.blocked_by, w.detail, w.needs, w.vms, waited, w.reserved)

    def queue_info(self, name: str) -> QueueInfo | None:
        self._refresh_waiting()
        w = self._waiting.get(name)
        return None if w is None else self._info(w)

    def list_queue(self, user: User) -> list[dict[str, Any]]:
        """The waiting requests in line order (a user sees their own; an admin all)."""
        rows = {r.id: r for r in qs.load_queue(self.store)}
        self._refresh_waiting()
        out = []
        for w in sorted(self._waiting.values(), key=lambda w: w.position):
            r = rows.get(w.id)
            if r is None or (r.owner != user.name and not user.admin):
                continue
            out.append(
                {
                    "env": w.id,
                    "owner": r.owner,
                    "project": r.project,
                    "kind": r.kind,
                    "priority": r.priority,
                    **self._info(w).to_dict(),
                }
            )
        return out

    def cancel_queued(self, name: str, user: User) -> bool:
        """Remove a queued ENV (its owner or an admin); False if it is not queued (any more)."""
        row = self._env_row(name, user)
        if row["state"] != "queued":
            return False
        gone = self._unqueue(name)
        if gone:
            self._publish(
                name,
                _error_event(EnvBusy(f"ENV {name} was cancelled while queued", hint="")),
                final=True,
            )
            log.info("ENV %s cancelled while queued", name)
        return gone


def _last_words(name: str, q: queue.Queue[EnvEvent | None]) -> Iterator[EnvEvent]:
    """An ENV whose rows are gone: its final event if one comes within a second (a cancel or
    a max_wait removes the rows first, then publishes why), else that it is gone."""
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        try:
            ev = q.get(timeout=left)
        except queue.Empty:
            break
        if ev is None:  # a poke: the final event, if any, is on the replica that had it
            continue
        yield ev
        if ev.final:
            return
    yield _error_event(EnvNotFound(f"ENV {name} is gone", hint="it was deleted or failed"))


def _changed(old: Waiting | None, new: Waiting) -> bool:
    return old is None or (old.position, old.blocked_by, old.detail) != (
        new.position,
        new.blocked_by,
        new.detail,
    )


def status_of(e: TTError) -> int:
    """The HTTP status the plain (non-streaming) request answers for this error."""
    for cls, status in (
        (BadInput, 400),
        (EnvNotFound, 404),
        (QueueTimeout, 408),
        (EnvExists | NoPlacement | EnvBusy | QueuedRefused, 409),
    ):
        if isinstance(e, cls):
            return status
    return 500


def _error_event(e: TTError) -> EnvEvent:
    return EnvEvent("error", error=ErrorBody(e.message, e.hint), status=status_of(e))


def _raised(ev: EnvEvent) -> TTError:
    """The error an error event stands for, as the plain request raises it."""
    cls: type[TTError] = {
        400: BadInput,
        404: EnvNotFound,
        408: QueueTimeout,
        409: QueuedRefused,
    }.get(ev.status, TTError)
    err = ev.error or ErrorBody("failed")
    return cls(err.error, hint=err.hint)
