"""The four custom-executor stages against the scheduler: the I/O half of the driver.

Decisions (target, size, names, exit codes) come from `runner_executor.core.job`; this module asks
the scheduler for the ENV, streams stage output into the job log and deletes the ENV.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO

from runner_executor.core import job
from ttci.client import config
from ttci.client.exec_stream import exec_events
from ttci.model.errors import ApiError, BadInput, TTError
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest
from ttci.wire.envs import VmUp
from ttci.wire.jobs import JobResult
from ttci.wire.queue import QueueInfo

if TYPE_CHECKING:  # requests costs ~150 ms to import: the run stage never needs it
    from ttci.client.scheduler import Client

__all__ = [
    "DELETE_WAIT_S",
    "RESULT_FILE",
    "TERM_GRACE_S",
    "Cancelled",
    "Driver",
    "DriverError",
]

RESULT_FILE = "tt-gitlab-result.json"  # in the runner's temp dir: what cleanup reports
TERM_GRACE_S = 10.0  # after SIGTERM the script gets this long before SIGKILL in the guest
DELETE_WAIT_S = 300.0  # cleanup waits this long for an ENV still being created


class DriverError(TTError):
    """Our own failure (configuration, scheduler, VM): a system failure, the runner retries."""


class Cancelled(TTError):
    """The runner sent SIGTERM (job cancelled or timed out)."""


@dataclass
class Driver:
    """One driver invocation: the runner's environment, the operator's limits, the job log."""

    env: Mapping[str, str]
    limits: job.Limits = field(default_factory=job.Limits)
    runner: str | None = None
    out: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)
    err: BinaryIO = field(default_factory=lambda: sys.stderr.buffer)
    client_factory: Callable[[], Client] | None = None

    def __post_init__(self) -> None:
        self.jv = job.job_vars(self.env)
        self.codes = job.ExitCodes.from_env(self.env)

    # -- helpers ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line in the job log (stderr: config's stdout is reserved for its JSON)."""
        self.err.write(f"TT CI: {text}\n".encode())
        self.err.flush()

    def client(self) -> Client:
        from ttci.client.scheduler import Client  # noqa: PLC0415 (see TYPE_CHECKING above)

        if self.client_factory is not None:
            return self.client_factory()
        return Client(self.cfg())

    def cfg(self) -> config.ClientConfig:
        try:
            return config.load()
        except BadInput as e:  # the runner host's set-up, not the job's: retryable
            raise DriverError(e.message, hint=e.hint) from e

    def exec_events(self, name: str, req: ExecRequest) -> Iterator[ExecEvent]:
        """A command's events through the standard-library stream (one process per stage)."""
        return exec_events(self.cfg(), name, req)

    def _write_build_code(self, code: int) -> None:
        path = self.env.get("BUILD_EXIT_CODE_FILE")
        if path:
            Path(path).write_text(f"{code}\n")

    def _result_path(self) -> Path | None:
        tmp = self.env.get("TMPDIR")
        return Path(tmp) / RESULT_FILE if tmp else None

    def record(self, result: str) -> None:
        """Keep the job's worst outcome so far (success < failed < cancelled < error) in the
        runner's temp dir, which every stage of one attempt shares; cleanup reports it."""
        path = self._result_path()
        if path is None:
            return
        new = JobResult(result)
        with contextlib.suppress(OSError, ValueError, TTError):
            old = JobResult.from_dict(json.loads(path.read_text())) if path.exists() else None
            if new.worse(old) != new:
                return
            path.write_text(json.dumps(new.to_dict()))

    # -- stages ----------------------------------------------------------------------------
    def prepare(self) -> int:
        name = job.env_name(self.jv)
        t = job.target(self.jv)
        sz = job.size(self.jv, self.limits)
        wait = job.wait_options(self.jv)
        c = self.client()
        image = job.pick_image(t, (i["name"] for i in c.get("/v1/images")))
        with contextlib.suppress(ApiError):  # 404: the usual case
            old = c.show_env(name)
            self.say(f"ENV {name} is left from an earlier attempt ({old['state']}); deleting it")
            self._delete(c, name)
        self.say(
            f"creating a fresh VM of {image} ({sz.cpus:g} CPU, {sz.memory_mib} MiB) "
            f"as ENV {name} ..."
        )
        t0 = time.monotonic()
        progress = _Progress(self, name)
        req = job.env_request(self.jv, image, sz, self.runner)
        try:
            with _term_raises(progress):  # ready means hostd's agent handshake succeeded
                c.create_env_progress(
                    req,
                    progress.on_vm,
                    on_queued=progress.on_queued,
                    on_granted=progress.on_granted,
                    wait=wait,
                )
        except Cancelled:
            self._withdraw(c, name)
            raise
        except ApiError as e:
            if e.status != 408:
                raise
            raise DriverError(
                f"ENV {name} waited longer than TT_MAX_WAIT ({wait.max_wait_s or 0:g} s) in TT "
                "CI's queue: the cloud stayed busy, so no VM was started",
                hint="raise TT_MAX_WAIT (or unset it to wait as long as it takes); the "
                "operator sees the queue with `tt queue` and can add hosts",
            ) from e
        self.say(f"ready in {time.monotonic() - t0:.1f} s")
        return 0

    def _withdraw(self, c: Client, name: str) -> None:
        """SIGTERM during prepare: take the request back at once (a queued one leaves the
        queue); one still booting is cleanup's to delete, which waits for it."""
        try:
            c.delete_env(name)
            self.say(f"ENV {name} withdrawn")
        except ApiError as e:
            if e.status == 409:
                self.say(f"ENV {name} is still booting; cleanup deletes it")
            elif e.status != 404:  # 404: the scheduler already took it out of the queue
                self.say(f"could not withdraw ENV {name} ({e.message}); cleanup retries")
        except TTError as e:
            self.say(f"could not withdraw ENV {name} ({e.message}); cleanup retries")

    def run(self, script: Path, stage: str) -> int:
        name = job.env_name(self.jv)
        try:
            data = script.read_bytes()
        except OSError as e:
            raise DriverError(f"cannot read the stage script {script}: {e}") from e
        last: ExecEvent | None = None
        with _Canceller(self, name) as canceller:
            for ev in self.exec_events(name, job.stage_request(data, stage)):
                if ev.kind in (EventKind.STDOUT, EventKind.STDERR):
                    stream = self.out if ev.kind is EventKind.STDOUT else self.err
                    stream.write(ev.data)
                    stream.flush()
                elif ev.final:
                    last = ev
        end = job.stage_end(last, self.codes)
        if end.build_exit_code is not None:
            self._write_build_code(end.build_exit_code)
        if end.driver_rc == self.codes.system_failure:
            self.say(f"stage {stage} failed in ENV {name}: {end.message}")
            self.record("error")
        elif canceller.started:
            self.record("cancelled")
        elif end.driver_rc != 0 and stage not in (*job.ON_FAILURE_STAGES, "after_script"):
            self.record("failed")
        else:
            self.record("success")
        return end.driver_rc

    def cleanup(self) -> int:
        try:
            name = job.env_name(self.jv)
        except job.JobError as e:
            self.say(f"nothing to clean up: {e.message}")
            return 0
        c = self.client()
        ok = self._report(c, name)  # first: the history keeps it even if the delete is slow
        gone = self._delete(c, name, commit_cache=ok)
        self.say(f"ENV {name} deleted" if gone else f"ENV {name} was already gone")
        return 0

    def _delete(self, c: Client, name: str, commit_cache: bool = False) -> bool:
        """Delete the ENV; True if it existed. Waits while the ENV is still being created.
        commit_cache: the job succeeded; its TT_CACHE keeps what it wrote."""
        return c.delete_env_wait(name, DELETE_WAIT_S, commit_cache=commit_cache)

    def _report(self, c: Client, name: str) -> bool:
        """Tell the scheduler's job history how the job ended (best effort); whether it
        succeeded."""
        path = self._result_path()
        if path is None or not path.exists():
            return False
        try:
            result = JobResult.from_dict(json.loads(path.read_text()))
        except (TTError, OSError, ValueError):
            return False
        with contextlib.suppress(TTError):
            c.report_result(name, result)
        return result.result == "success"


class _Progress:
    """prepare's job-log lines while the ENV is made: its place in TT CI's queue while the cloud
    is busy (a line when the place changes, else at most every QUEUE_LINE_EVERY_S), the grant,
    then each VM up."""

    def __init__(self, driver: Driver, name: str) -> None:
        self.driver, self.name = driver, name
        self.last: tuple[int, float] | None = None  # (position, when) of the last line
        self.position: int | None = None  # while queued
        self.granted = False

    def on_queued(self, info: QueueInfo) -> None:
        if self.position is None:
            self.driver.say(
                f"the cloud is busy: ENV {self.name} waits in TT CI's queue for its turn "
                "(the job starts as soon as capacity frees; operators: `tt queue`)"
            )
        self.position = info.position
        now = time.monotonic()
        if job.queue_news(self.last, info.position, now):
            self.driver.say(info.sentence())
            self.last = (info.position, now)

    def on_granted(self, waited_s: float) -> None:
        """Also sent when nothing waited, and again on a re-attached stream: a line only
        for the end of a wait."""
        if self.position is not None:
            self.driver.say(f"capacity granted after {waited_s:.0f} s in the queue; booting the VM")
        self.granted, self.position = True, None

    def on_vm(self, vm: VmUp) -> None:
        emulated = " (TCG: emulated, slower than native)" if vm.accel == "tcg" else ""
        self.driver.say(
            f"VM {vm.vm} is up on host {vm.host} with {vm.accel}"
            f"{emulated} after {vm.boot_s:.1f} s of boot"
        )

    def cancelled(self) -> Cancelled:
        if self.position is not None:
            return Cancelled(
                f"the runner stopped the job (SIGTERM) while it waited in TT CI's queue "
                f"(position {self.position}); its request is withdrawn"
            )
        return Cancelled("the runner stopped the job (SIGTERM) while the VM was being created")


@contextlib.contextmanager
def _term_raises(progress: _Progress) -> Iterator[None]:
    """While creating the ENV, SIGTERM aborts with Cancelled (closing the scheduler's stream:
    a queued request leaves the queue; cleanup deletes what exists)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise progress.cancelled()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Canceller:
    """SIGTERM during a stage: TERM the script's process group in the guest, KILL it after
    TERM_GRACE_S, and give up on the stream if even that gets no answer. The main thread keeps
    streaming, so the script's last output and its exit code still reach the job log."""

    def __init__(self, driver: Driver, name: str) -> None:
        self.driver, self.name = driver, name
        self.started = False
        self.done = threading.Event()
        self.old: Any = None

    def __enter__(self) -> _Canceller:
        self.old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        signal.signal(signal.SIGTERM, self.old)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        if self.started:
            return
        self.started = True
        threading.Thread(target=self._stop, daemon=True).start()

    def _signal(self, sig: str) -> None:
        with contextlib.suppress(TTError):
            for _ in self.driver.exec_events(
                self.name, ExecRequest(tuple(job.signal_command(sig)))
            ):
                pass

    def _stop(self) -> None:
        self.driver.say("the runner cancelled the job: stopping the script in the VM")
        self._signal("TERM")
        if self.done.wait(TERM_GRACE_S):
            return
        self._signal("KILL")
        if self.done.wait(5):
            return
        self.driver.say("the VM does not answer; giving up on this stage")
        self.driver._write_build_code(1)
        os._exit(self.driver.codes.system_failure)
