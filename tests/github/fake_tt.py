"""A stand-in for the scheduler's client as the GitHub service uses it: a cloud with room for
`capacity` one-VM ENVs and an admission queue in front of it (FIFO), with the real client's
calling conventions (create_env_progress's queued/granted callbacks, a DELETE that takes a
queued ENV out of the queue and ends its stream with an error, exec streams that last as long
as the runner). Fast tests drive the whole service through it; the real-VM tests use the real
scheduler."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ttci.model.errors import ApiError, TTError
from ttci.model.resources import Resources
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest, ExitStatus
from ttci.wire.envs import EnvRequest, VmUp
from ttci.wire.jobs import JobResult
from ttci.wire.queue import QueueInfo, WaitOptions

__all__ = ["FakeEnv", "FakeTT"]


@dataclass
class FakeEnv:
    name: str
    origin: dict[str, str]
    state: str = "queued"  # queued, ready, gone
    runner_exit: int | None = None  # set by the test: the runner in it exits with this code
    events: list[str] = field(default_factory=list)


class FakeTT:
    """The parts of ttci.client.scheduler.Client the GitHub service calls."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.envs: dict[str, FakeEnv] = {}
        self.queue: list[str] = []  # waiting ENV names, FIFO
        self.cond = threading.Condition()
        self.granted: dict[str, float] = {}  # ENV -> when it was granted (epoch seconds)
        self.results: dict[str, str] = {}

    # -- the test's side -----------------------------------------------------------------------
    def running(self) -> list[str]:
        with self.cond:
            return [n for n, e in self.envs.items() if e.state == "ready"]

    def end_runner(self, env: str, code: int = 0) -> None:
        with self.cond:
            self.envs[env].runner_exit = code
            self.cond.notify_all()

    # -- the client's side ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"user": "github-svc", "admin": False}

    def create_env_progress(
        self,
        req: EnvRequest | dict[str, Any],
        on_vm: Callable[[VmUp], None],
        *,
        on_queued: Callable[[QueueInfo], None] | None = None,
        on_granted: Callable[[float], None] | None = None,
        wait: WaitOptions | None = None,
    ) -> dict[str, Any]:
        assert isinstance(req, EnvRequest) and wait is not None and wait.wait
        t0 = time.monotonic()
        with self.cond:
            if req.name in self.envs:
                raise ApiError(f"ENV {req.name} exists", status=409)
            env = self.envs[req.name] = FakeEnv(req.name, dict(req.origin))
            self.queue.append(req.name)
            told = -1
            while True:
                if env.state == "gone":
                    raise ApiError(f"ENV {req.name} was cancelled while queued", status=409)
                if self.queue and self.queue[0] == req.name and self._free() > 0:
                    break
                pos = self.queue.index(req.name) + 1
                if pos != told and on_queued is not None:
                    told = pos
                    info = QueueInfo(pos, "capacity", "all busy", Resources(1, 384, 0), 1, 0.0)
                    self.cond.release()
                    try:
                        on_queued(info)
                    finally:
                        self.cond.acquire()
                    continue
                self.cond.wait(0.5)
            self.queue.remove(req.name)
            env.state = "ready"
            self.granted[req.name] = time.time()
            self.cond.notify_all()
        if on_granted is not None:
            on_granted(time.monotonic() - t0)
        return {"name": req.name, "state": "ready", "vms": [{"guest_boot_s": 0.01}]}

    def _free(self) -> int:
        return self.capacity - sum(1 for e in self.envs.values() if e.state == "ready")

    def delete_env_wait(
        self, name: str, wait_s: float = 300.0, poll_s: float = 1.0, commit_cache: bool = False
    ) -> bool:
        with self.cond:
            env = self.envs.get(name)
            if env is None or env.state == "gone":
                return False
            if name in self.queue:
                self.queue.remove(name)
            env.state = "gone"
            self.cond.notify_all()
            return True

    def exec(self, name: str, req: ExecRequest) -> Iterator[ExecEvent]:
        with self.cond:
            env = self.envs.get(name)
            if env is None or env.state != "ready":
                raise TTError(f"ENV {name} is not ready")
        yield ExecEvent.output(EventKind.STDERR, b"ttci: starting /opt/actions-runner/run.sh\n")
        with self.cond:
            while env.runner_exit is None and env.state == "ready":
                self.cond.wait(0.5)
            code = env.runner_exit
        if code is None:
            yield ExecEvent.error("the VM is gone", lost=True)
        else:
            yield ExecEvent.exit(ExitStatus(code))

    def get(self, path: str, **params: Any) -> Any:
        assert path == "/v1/envs"
        with self.cond:
            return [
                {"name": e.name, "origin": e.origin, "state": e.state}
                for e in self.envs.values()
                if e.state != "gone"
            ]

    def report_result(self, name: str, result: JobResult) -> dict[str, Any]:
        self.results[name] = result.result
        return {}
