"""`tt job run`: one command in a fresh VM per target, for Jenkins and any shell-based CI.

Each target (OS x ARCH) gets a one-VM ENV: the working directory (or `git archive REF`) is copied
in, the command runs with its output streamed, declared artifacts are copied back, the job's
result is reported to the job history, and the ENV is deleted — also on Ctrl-C, SIGTERM, a
timeout or an error. The exit code is the command's (the first failing target's in a matrix).
The ENV's lifetime is the timeout plus a margin, so even a `kill -9` of `tt` leaks nothing for
long: the scheduler's reaper takes it back.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import fnmatch
import io
import itertools
import os
import secrets
import signal
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from rich.console import Console
from rich.table import Table

from ttci.client import config
from ttci.client.scheduler import ApiError, Client
from ttci.infra.proc import run
from ttci.model.errors import BadInput, TTError
from ttci.model.naming import parse_arch
from ttci.scheduler.planning.envspec import parse_duration

__all__ = [
    "DELETE_WAIT_S",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TIMEOUT",
    "LIFE_MARGIN_S",
    "SCRIPT_DIR",
    "WORKDIR",
    "Job",
    "JobSpec",
    "Outcome",
    "Output",
    "Target",
    "cmd_job_run",
    "env_name",
    "exit_code",
    "git_archive",
    "guest_path",
    "image_for",
    "local_parent",
    "origin_from_env",
    "parse_targets",
    "register",
    "result_word",
    "tar_dir",
]

WORKDIR = "/root/work"
SCRIPT_DIR = "/root/.tt-job"
LIFE_MARGIN_S = 600  # the ENV outlives the command's timeout by this much, then the reaper acts
DELETE_WAIT_S = 600  # how long cleanup waits for an ENV still booting
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


# -- plan (pure) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    os: str  # e.g. debian-12 or debian-12+systemd
    arch: str  # Debian name

    @property
    def label(self) -> str:
        return f"{self.os}/{self.arch}"

    @property
    def slug(self) -> str:
        return f"{self.os}-{self.arch}".replace("+", "-")


def parse_targets(oses: str, arches: str) -> list[Target]:
    """`--os a,b --arch x,y` -> every combination, in order."""
    os_list = [o.strip().lower() for o in oses.split(",") if o.strip()]
    arch_list = [parse_arch(a).value for a in arches.split(",") if a.strip()]
    if not os_list or not arch_list:
        raise BadInput("--os and --arch must name at least one value", hint="--os debian-12")
    out = [Target(o, a) for o, a in itertools.product(os_list, arch_list)]
    return list(dict.fromkeys(out))


def image_for(target: Target, images: list[str]) -> str:
    """The one image that serves a target, or BadInput naming the targets that exist."""
    found = [i for i in images if i.lower().split(":", 1)[-1] == f"{target.os}:{target.arch}"]
    if len(found) == 1:
        return found[0]
    have = sorted({"/".join(i.split(":", 1)[-1].rsplit(":", 1)) for i in images})
    raise BadInput(
        f"no image serves --os {target.os} --arch {target.arch}"
        if not found
        else f"{len(found)} images serve {target.label}: {', '.join(found)}",
        hint=f"targets in this cloud: {', '.join(have) or 'none (build images first)'}",
    )


def origin_from_env(environ: dict[str, str], target: Target) -> dict[str, str]:
    """Where the job comes from: Jenkins (JENKINS_URL/BUILD_URL set) or the command line."""
    if environ.get("JENKINS_URL") or environ.get("BUILD_URL"):
        job = environ.get("JOB_NAME", "")
        number = environ.get("BUILD_NUMBER", "")
        out = {
            "kind": "jenkins",
            "job": f"{job} #{number} {target.label}".strip() if number else target.label,
            "project": job,
            "runner": environ.get("NODE_NAME", ""),
        }
        url = environ.get("BUILD_URL", "")
        if url.startswith(("http://", "https://")):
            out["url"] = url
    else:
        out = {"kind": "cli", "job": f"tt job run {target.label}", "runner": socket.gethostname()}
    return {k: v[:200] for k, v in out.items() if v}


def env_name(target: Target, tag: str) -> str:
    """A unique, valid ENV name (1-40 of [a-z0-9-]) that says what it is."""
    return f"job-{tag}-{target.slug}"[:40].rstrip("-")


def exit_code(ev: dict[str, Any] | None) -> int:
    """The job's exit code from the command's final event."""
    if ev is None or ev.get("event") != "exit":
        return EXIT_ERROR
    if ev.get("timed_out"):
        return EXIT_TIMEOUT
    if ev.get("signal"):
        return 128 + int(ev["signal"])
    return int(ev.get("code") or 0)


def result_word(code: int, interrupted: bool, error: str) -> str:
    if interrupted:
        return "cancelled"
    if error:
        return "error"
    return "success" if code == 0 else "failed"


def guest_path(path: str) -> str:
    """An artifact path as the guest sees it (relative ones are in the work directory)."""
    return path if path.startswith("/") else str(PurePosixPath(WORKDIR) / path)


def local_parent(path: str, base: Path) -> Path:
    """Where an artifact lands: relative paths mirror their directory under base."""
    if path.startswith("/"):
        return base
    rel = PurePosixPath(path)
    if ".." in rel.parts:
        raise BadInput(f"artifact {path!r} leaves the work directory", hint="drop the ..")
    return base / rel.parent


# -- doing it --------------------------------------------------------------------------------
@dataclass
class Outcome:
    target: Target
    env: str
    image: str = ""
    host: str = ""
    accel: str = ""
    boot_s: float = 0.0
    run_s: float = 0.0
    code: int = EXIT_ERROR
    error: str = ""
    artifacts: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if self.code == EXIT_TIMEOUT:
            return "timed out"
        return "ok" if self.code == 0 else f"exit {self.code}"


class Output:
    """Writes a target's output: raw for one target, line-prefixed for a matrix."""

    def __init__(self, prefix: bool) -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.partial: dict[tuple[str, str], bytes] = {}

    def _stream(self, kind: str) -> BinaryIO:
        return sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer

    def write(self, label: str, kind: str, data: bytes) -> None:
        with self.lock:
            out = self._stream(kind)
            if not self.prefix:
                out.write(data)
                out.flush()
                return
            *lines, rest = (self.partial.get((label, kind), b"") + data).split(b"\n")
            self.partial[(label, kind)] = rest
            for line in lines:
                out.write(b"[" + label.encode() + b"] " + line + b"\n")
            out.flush()

    def flush(self, label: str) -> None:
        with self.lock:
            for kind in ("stdout", "stderr"):
                rest = self.partial.pop((label, kind), b"")
                if rest:
                    self._stream(kind).write(b"[" + label.encode() + b"] " + rest + b"\n")
                    self._stream(kind).flush()


@dataclass
class JobSpec:
    targets: list[Target]
    argv: list[str]  # run with cwd WORKDIR
    cpus: float
    memory_mib: int
    disk_gib: int
    timeout_s: int
    artifacts: list[str]
    artifact_dir: Path
    upload: Callable[[], bytes | None]  # the tar to unpack into WORKDIR (None: nothing)
    script: tuple[str, bytes] | None  # (file name, content) pushed to SCRIPT_DIR
    quiet: bool


class Job:
    """Runs a JobSpec's targets in parallel; `cleanup` deletes every ENV it may have made."""

    def __init__(self, spec: JobSpec, client: Client, environ: dict[str, str]) -> None:
        self.spec = spec
        self.client = client
        self.environ = environ
        self.tag = secrets.token_hex(3)
        self.out = Output(prefix=len(spec.targets) > 1)
        self.interrupted = threading.Event()
        self._deleted: set[str] = set()
        self._lock = threading.Lock()
        self._env_locks: dict[str, threading.Lock] = {}
        self.outcomes = {t: Outcome(t, env_name(t, self.tag)) for t in spec.targets}

    def say(self, target: Target, text: str) -> None:
        if not self.spec.quiet:
            with self.out.lock:
                err.print(f"tt: [{target.label}] {text}", markup=False)

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
        final: dict[str, Any] | None = None
        try:
            self._create(t, o)
            if self.interrupted.is_set():
                return
            if upload is not None:
                self.say(t, f"copying {len(upload) >> 10} KiB into {WORKDIR}")
                self._check_push(self.client.push(o.env, WORKDIR, upload))
            if self.spec.script:
                self._check_push(self.client.push(o.env, SCRIPT_DIR, _script_tar(self.spec.script)))
            t0 = time.monotonic()
            final = self._run(t, o)
            o.run_s = time.monotonic() - t0
            o.code = exit_code(final)
            if final and final.get("event") == "error":
                o.error = str(final.get("message"))
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
        body = {
            "name": o.env,
            "os_prefix": o.image,
            "cpus": self.spec.cpus,
            "memory_mib": self.spec.memory_mib,
            "disk_gib": self.spec.disk_gib,
            "life_time": self.spec.timeout_s + LIFE_MARGIN_S,
            "origin": origin_from_env(self.environ, t),
        }
        self.say(t, f"starting a fresh VM ({o.image}, ENV {o.env}) ...")
        env = self.client.create_env(body)
        [vm] = env["vms"]
        o.host, o.accel, o.boot_s = vm["host"], vm["accel"], vm["boot_s"]
        self.say(t, f"VM up on {o.host} ({o.accel}) in {o.boot_s:.1f} s")

    def _check_push(self, res: list[dict[str, Any]]) -> None:
        bad = [r for r in res if not r.get("ok")]
        if bad:
            raise TTError(f"copying into the VM failed: {bad[0].get('error')}")

    def _run(self, t: Target, o: Outcome) -> dict[str, Any] | None:
        body = {
            "argv": self.spec.argv,
            "cwd": WORKDIR,
            "timeout": self.spec.timeout_s,
            "env": {"CI": "true", "TT_JOB_OS": t.os, "TT_JOB_ARCH": t.arch, "HOME": "/root"},
        }
        final = None
        for ev in self.client.run(o.env, body):
            kind = ev.get("event")
            if kind in ("stdout", "stderr"):
                self.out.write(t.label, kind, base64.b64decode(ev.get("data", "")))
            elif kind in ("exit", "error"):
                final = ev
        return final

    def _fetch(self, t: Target, o: Outcome) -> None:
        base = self.spec.artifact_dir / (t.slug if len(self.spec.targets) > 1 else "")
        for path in self.spec.artifacts:
            try:
                [res] = self.client.get_files(o.env, guest_path(path))
            except TTError as e:
                self.say(t, f"artifact {path}: {e.message}")
                continue
            if not res.get("ok"):
                self.say(t, f"artifact {path} not copied back: {res.get('error')}")
                continue
            dest = local_parent(path, base)
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(res["data"]))) as tar:
                tar.extractall(dest, filter="data")
            where = dest / PurePosixPath(path).name
            o.artifacts.append(str(where))
            self.say(t, f"artifact {path} -> {where}")

    def _finish(self, t: Target, o: Outcome) -> None:
        result = result_word(o.code, self.interrupted.is_set(), o.error)
        with contextlib.suppress(TTError):  # no job row: the ENV never became ready
            self.client.report_result(o.env, result)
        self._delete(o.env, t)

    def _delete(self, env: str, t: Target) -> None:
        with self._lock:
            lock = self._env_locks.setdefault(env, threading.Lock())
        with (
            lock
        ):  # one delete per ENV at a time (cleanup and its worker): the second finds it done
            self._delete_once(env, t)

    def _delete_once(self, env: str, t: Target) -> None:
        if env in self._deleted:
            return
        deadline = time.monotonic() + DELETE_WAIT_S
        while True:
            try:
                self.client.delete_env(env)
                self._deleted.add(env)
                self.say(t, f"ENV {env} deleted")
                return
            except ApiError as e:
                if e.status == 404:
                    return  # not made (yet: its creator deletes it when done), or gone
                if e.status == 409 and time.monotonic() < deadline:
                    time.sleep(1)  # still booting: delete it as soon as it is ready
                    continue
                err.print(f"tt: could not delete ENV {env}: {e.message}; the reaper will")
                return
            except TTError as e:
                err.print(f"tt: could not delete ENV {env}: {e.message}; the reaper will")
                return

    def cleanup(self) -> None:
        """Delete every ENV of this job (Ctrl-C, SIGTERM): in parallel, uninterruptible."""
        outcomes = list(self.outcomes.values())
        with _signals_held():
            err.print(f"tt: interrupted; deleting {', '.join(o.env for o in outcomes)} ...")
            with concurrent.futures.ThreadPoolExecutor(len(outcomes)) as pool:
                list(pool.map(lambda o: self._delete(o.env, o.target), outcomes))


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


def _script_tar(script: tuple[str, bytes]) -> bytes:
    name, content = script
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(content), 0o755, int(time.time())
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _empty_tar() -> bytes:
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    return buf.getvalue()


def tar_dir(root: Path, excludes: list[str]) -> bytes:
    """The working directory as a tar (its contents at the top), minus excluded names."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = info.name.removeprefix("./")
        if rel != "." and any(
            fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(Path(rel).name, pat) for pat in excludes
        ):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".", filter=keep)
    return buf.getvalue()


def git_archive(ref: str, repo: Path) -> bytes:
    """`git archive REF` of the repository at repo: a clean checkout of that ref."""
    try:
        return run(["git", "-C", str(repo), "archive", "--format=tar", ref]).stdout
    except TTError as e:
        raise BadInput(
            f"cannot check out --git-ref {ref!r} here: {e.message}",
            hint="run in a git repository and name a commit, branch or tag it has",
        ) from e


# -- the CLI ---------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    j = sub.add_parser("job", help="one-shot jobs in fresh VMs (for Jenkins and shell CI)")
    js = j.add_subparsers(dest="job_cmd", required=True, metavar="VERB")
    r = js.add_parser(
        "run",
        help="run a command in a fresh VM per OS x ARCH target; exit with its exit code",
        description="Create a one-VM ENV per target, copy the working directory in (or `git "
        "archive` a ref), run COMMAND in it with output streamed, copy artifacts back, delete "
        "the ENV (also on Ctrl-C, SIGTERM and timeout) and exit with the command's exit code.",
    )
    r.add_argument("--os", required=True, help="OS release(s), comma separated, e.g. debian-12")
    r.add_argument("--arch", required=True, help="architecture(s), comma separated, e.g. arm64")
    r.add_argument("--cpu", type=float, default=1, help="vCPUs of the VM (default 1)")
    r.add_argument("--mem", type=int, default=1024, help="MiB of memory of the VM (default 1024)")
    r.add_argument("--disk", type=int, default=0, help="GiB of disk (default: the image's)")
    r.add_argument("--timeout", default="1h", help="kill the command after this long (1h)")
    r.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="PATH",
        help="file or directory to copy back (relative to the work directory); repeatable",
    )
    r.add_argument(
        "--artifact-dir",
        type=Path,
        help="where artifacts land (default: here; a matrix puts each target in a subdirectory "
        "of ./tt-artifacts)",
    )
    src = r.add_mutually_exclusive_group()
    src.add_argument("--git-ref", help="copy `git archive REF` of this repository, not the tree")
    src.add_argument("--no-copy", action="store_true", help="copy nothing into the VM")
    r.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out matching files when copying the working directory; repeatable",
    )
    r.add_argument("--script", type=Path, help="run this local script instead of a COMMAND")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only output")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    r.set_defaults(func=cmd_job_run)


def _spec(args: argparse.Namespace) -> JobSpec:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if bool(command) == bool(args.script):
        raise BadInput(
            "give either -- COMMAND or --script FILE (one of them)",
            hint="tt job run --os debian-12 --arch amd64 -- make test",
        )
    script = None
    if args.script:
        if not args.script.is_file():
            raise BadInput(f"script {args.script} does not exist", hint="give a local file")
        script = (args.script.name, args.script.read_bytes())
        argv = ["/bin/sh", "-c", 'chmod +x "$0" && exec "$0"', f"{SCRIPT_DIR}/{args.script.name}"]
    elif len(command) == 1:
        argv = ["/bin/sh", "-c", command[0]]  # one word: a shell command line
    else:
        argv = command
    targets = parse_targets(args.os, args.arch)
    here = Path.cwd()
    upload: Callable[[], bytes | None]
    if args.no_copy:
        upload = _empty_tar  # still makes the work directory
    elif args.git_ref:
        upload = lambda: git_archive(args.git_ref, here)  # noqa: E731
    else:
        upload = lambda: tar_dir(here, args.exclude)  # noqa: E731
    default_dir = Path("tt-artifacts") if len(targets) > 1 else Path()
    return JobSpec(
        targets=targets,
        argv=argv,
        cpus=args.cpu,
        memory_mib=args.mem,
        disk_gib=args.disk,
        timeout_s=parse_duration(args.timeout),
        artifacts=args.artifact,
        artifact_dir=args.artifact_dir or default_dir,
        upload=upload,
        script=script,
        quiet=args.quiet,
    )


def cmd_job_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    for a in spec.artifacts:
        local_parent(a, spec.artifact_dir)  # refuse bad paths before any VM exists
    job = Job(spec, Client(config.load()), dict(os.environ))
    outcomes = job.run_all()
    if len(outcomes) > 1 or not spec.quiet:
        _summary(outcomes)
    failed = [o for o in outcomes if o.error or o.code]
    if not failed:
        return 0
    return failed[0].code if not failed[0].error else EXIT_ERROR


def _summary(outcomes: list[Outcome]) -> None:
    t = Table(title="tt job run")
    for col in ("target", "image", "host", "boot", "run", "result", "artifacts"):
        t.add_column(col, overflow="fold")
    for o in outcomes:
        t.add_row(
            o.target.label,
            o.image,
            f"{o.host} ({o.accel})" if o.host else "",
            f"{o.boot_s:.1f} s" if o.boot_s else "",
            f"{o.run_s:.1f} s" if o.run_s else "",
            o.summary,
            str(len(o.artifacts)),
        )
    err.print(t)
