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

        def on_vm(vm: VmUp) -> None:
            emulated = " (TCG: emulated, slower than native)" if vm.accel == "tcg" else ""
            self.say(
                f"VM {vm.vm} is up on host {vm.host} with {vm.accel}"
                f"{emulated} after {vm.boot_s:.1f} s of boot"
            )

        req = job.env_request(self.jv, image, sz, self.runner)
        with _term_raises():
            c.create_env_progress(req, on_vm)  # ready means hostd's agent handshake succeeded
        self.say(f"ready in {time.monotonic() - t0:.1f} s")
        return 0

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
        self._report(c, name)  # first: the history keeps it even if the delete is slow
        gone = self._delete(c, name)
        self.say(f"ENV {name} deleted" if gone else f"ENV {name} was already gone")
        return 0

    def _delete(self, c: Client, name: str) -> bool:
        """Delete the ENV; True if it existed. Waits while the ENV is still being created."""
        return c.delete_env_wait(name, DELETE_WAIT_S)

    def _report(self, c: Client, name: str) -> None:
        """Tell the scheduler's job history how the job ended (best effort)."""
        path = self._result_path()
        if path is None or not path.exists():
            return
        with contextlib.suppress(TTError, OSError, ValueError):
            c.report_result(name, JobResult.from_dict(json.loads(path.read_text())))


@contextlib.contextmanager
def _term_raises() -> Iterator[None]:
    """While creating the ENV, SIGTERM aborts with Cancelled (cleanup deletes what exists)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Cancelled("the runner stopped the job (SIGTERM) while the VM was being created")

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
