"""`tt job run`'s runner: one ENV per target, in parallel, each deleted whatever happens."""

from __future__ import annotations

import concurrent.futures
import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from ttci.cli.artifacts import archive_root, extract_b64, script_tar
from ttci.cli.job_output import Output, err
from ttci.cli.job_plan import (
    DELETE_WAIT_S,
    EXIT_TIMEOUT,
    SCRIPT_DIR,
    WORKDIR,
    JobSpec,
    Outcome,
    Target,
    env_name,
    env_request,
    exec_request,
    exit_code,
    guest_path,
    image_for,
    local_parent,
    queue_news,
    result_word,
)
from ttci.client.scheduler import Client
from ttci.model.errors import ApiError, TTError
from ttci.wire.commands import EventKind, ExecEvent
from ttci.wire.envs import VmUp
from ttci.wire.queue import QueueInfo, WaitOptions

__all__ = ["Job"]


class Job:
    """Runs a JobSpec's targets in parallel; `cleanup` deletes every ENV it may have made."""

    def __init__(self, spec: JobSpec, client: Client, environ: dict[str, str]) -> None:
        self.spec = spec
        self.client = client
        self.environ = environ
        self.tag = secrets.token_hex(3)
        self.out = Output(prefix=len(spec.targets) > 1, all_to_stderr=spec.json_out)
        self.interrupted = threading.Event()
        self._deleted: set[str] = set()
        self._lock = threading.Lock()
        self._env_locks: dict[str, threading.Lock] = {}
        self.outcomes = {t: Outcome(t, env_name(t, self.tag)) for t in spec.targets}

    def say(self, target: Target, text: str) -> None:
        if not self.spec.quiet:
            self.out.say(target.label, text)

    def run_all(self) -> list[Outcome]:
        images = [i["name"] for i in self.client.get("/v1/images")]
        chosen = {t: image_for(t, images) for t in self.spec.targets}  # all or none: checked first
        upload = self.spec.upload()
        if len(self.spec.targets) == 1:
            [t] = self.spec.targets
            self._one(t, chosen[t], upload)
            return [self.outcomes[t]]
        with concurrent.futures.ThreadPoolExecutor(len(self.spec.targets)) as pool:
            futures = [pool.submit(self._one, t, chosen[t], upload) for t in self.spec.targets]
            try:
                while not all(f.done() for f in futures):
                    time.sleep(0.1)  # the main thread stays interruptible
            except BaseException:
                self.interrupted.set()
                self.cleanup()  # deleting the ENVs ends the workers' streams
                raise
        return [self.outcomes[t] for t in self.spec.targets]

    def _one(self, t: Target, image: str, upload: bytes | None) -> None:
        o = self.outcomes[t]
        o.image = image
        try:
            self._create(t, o)
            if self.interrupted.is_set():
                return
            if upload is not None:
                self.say(t, f"copying {len(upload) >> 10} KiB into {WORKDIR}")
                self._check_push(self.client.push(o.env, WORKDIR, upload))
            if self.spec.script:
                self._check_push(self.client.push(o.env, SCRIPT_DIR, script_tar(self.spec.script)))
            t0 = time.monotonic()
            final = self._run(t, o)
            o.run_s = time.monotonic() - t0
            o.code = exit_code(final)
            if final is not None and final.kind is EventKind.ERROR:
                o.error = final.message
            elif o.code == EXIT_TIMEOUT:
                self.say(t, f"the command timed out after {self.spec.timeout_s} s and was killed")
            self._fetch(t, o)
        except TTError as e:
            if not self.interrupted.is_set():
                o.error = e.message + (f" ({e.hint})" if e.hint else "")
                self.say(t, f"error: {o.error}")
        except BaseException:  # Ctrl-C or SIGTERM in the main thread (a single target)
            self.interrupted.set()
            raise
        finally:
            self.out.flush(t.label)
            with _signals_held():
                self._finish(t, o)

    def _create(self, t: Target, o: Outcome) -> None:
        """The target's ENV, waiting in the admission queue for capacity (--max-wait bounds
        it); a line when its place in line changes. Raises TTError (queue_timeout: no VM)."""
        self.say(t, f"starting a fresh VM ({o.image}, ENV {o.env}) ...")
        last: tuple[int, float] | None = None  # the last queue line: (position, when)
        granted = False

        def on_queued(info: QueueInfo) -> None:
            nonlocal last
            if self.interrupted.is_set():  # cleanup ran before this request got in: leave
                raise TTError("interrupted")
            if last is None:
                self.say(t, "the cloud is busy: waiting in TT CI's queue (`tt queue` shows it)")
            now = time.monotonic()
            if queue_news(last, info.position, now):
                self.say(t, info.sentence())
                last = (info.position, now)

        def on_granted(waited_s: float) -> None:  # also when nothing waited: then no line
            nonlocal granted
            if last is not None and not granted:
                o.queued_s = waited_s
                self.say(t, f"granted after {waited_s:.0f} s in the queue: booting")
            granted = True

        req = env_request(self.spec, t, o.env, o.image, self.environ)
        try:
            env = self.client.create_env_progress(
                req,
                _ignore_vm,
                on_queued=on_queued,
                on_granted=on_granted,
                wait=WaitOptions(max_wait_s=self.spec.max_wait_s),
            )
        except ApiError as e:
            if e.status != 408:
                raise
            o.queue_timeout = True
            raise TTError(
                f"no VM within --max-wait {self.spec.max_wait_s or 0:g} s: the cloud stayed busy "
                "and the command did not run",
                hint="retry later, allow a longer --max-wait, or ask for a smaller VM",
            ) from e
        [vm] = env["vms"]
        o.host, o.accel, o.boot_s = vm["host"], vm["accel"], vm["boot_s"]
        self.say(t, f"VM up on {o.host} ({o.accel}) in {o.boot_s:.1f} s")

    def _check_push(self, res: list[dict[str, Any]]) -> None:
        bad = [r for r in res if not r.get("ok")]
        if bad:
            raise TTError(f"copying into the VM failed: {bad[0].get('error')}")

    def _run(self, t: Target, o: Outcome) -> ExecEvent | None:
        final = None
        for ev in self.client.exec(o.env, exec_request(self.spec, t)):
            if ev.kind in (EventKind.STDOUT, EventKind.STDERR):
                self.out.write(t.label, ev.kind.value, ev.data)
            elif ev.final:
                final = ev
        return final

    def _fetch(self, t: Target, o: Outcome) -> None:
        base = self.spec.artifact_dir / (t.slug if len(self.spec.targets) > 1 else "")
        for path in self.spec.artifacts:
            try:
                [res] = self.client.get_files(o.env, guest_path(path), self.spec.max_bytes)
            except TTError as e:
                self.say(t, f"artifact {path}: {e.message}")
                continue
            if not res.get("ok"):
                self.say(t, f"artifact {path} not copied back: {res.get('error')}")
                continue
            dest = local_parent(path, base)
            try:  # only the requested path, plain files and directories (a guest is untrusted)
                extract_b64(res["data"], dest, archive_root(guest_path(path)), self.spec.max_bytes)
            except TTError as e:
                o.error = o.error or f"artifact {path} refused: {e.message}"
                self.say(t, f"artifact {path} refused: {e.message}")
                continue
            where = dest / PurePosixPath(path).name
            o.artifacts.append(str(where))
            self.say(t, f"artifact {path} -> {where}")

    def _finish(self, t: Target, o: Outcome) -> None:
        result = result_word(o.code, self.interrupted.is_set(), o.error)
        with contextlib.suppress(TTError):  # no job row: the ENV never became ready
            self.client.report_result(o.env, result)
        self._delete(o.env, t, commit=result.result == "success")

    def _delete(self, env: str, t: Target, commit: bool = False) -> None:
        """commit: the job succeeded, its cache (if it has one) keeps what it wrote."""
        with self._lock:
            lock = self._env_locks.setdefault(env, threading.Lock())
        # one delete per ENV at a time (cleanup and its worker): the second finds it done
        with lock:
            self._delete_once(env, t, commit)

    def _delete_once(self, env: str, t: Target, commit: bool) -> None:
        if env in self._deleted:
            return
        try:  # an ENV still booting is deleted as soon as it is ready
            if not self.client.delete_env_wait(env, DELETE_WAIT_S, commit_cache=commit):
                return  # not made (yet: its creator deletes it when done), or gone
        except TTError as e:
            err.print(f"tt: could not delete ENV {env}: {e.message}; the reaper will")
            return
        self._deleted.add(env)
        self.say(t, f"ENV {env} deleted")

    def cleanup(self) -> None:
        """Delete every ENV of this job (Ctrl-C, SIGTERM): in parallel, uninterruptible."""
        outcomes = list(self.outcomes.values())
        with _signals_held():
            err.print(f"tt: interrupted; deleting {', '.join(o.env for o in outcomes)} ...")
            with concurrent.futures.ThreadPoolExecutor(len(outcomes)) as pool:
                list(pool.map(lambda o: self._delete(o.env, o.target), outcomes))


def _ignore_vm(vm: VmUp) -> None:
    """One VM per target: the ready ENV says where it runs."""


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (cleanup must not be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            err.print("tt: cleanup finished; the signal that came meanwhile was held")
