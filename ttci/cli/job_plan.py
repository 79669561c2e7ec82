"""`tt job run`'s plan, no I/O but the host's name: targets, images, ENV names, the origin shown
to operators, the requests sent to the scheduler, artifact paths and exit codes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ttci.model.cache import CacheSpec
from ttci.model.egress import EgressRule
from ttci.model.errors import BadInput
from ttci.model.naming import (
    DEFAULT_PROFILE,
    ENGINES,
    Target,
    image_targets,
    images_serving,
    parse_arch,
    parse_os,
    parse_target,
)
from ttci.wire.commands import ExecEvent, ExecRequest
from ttci.wire.envs import EnvRequest
from ttci.wire.jobs import JobResult

__all__ = [
    "DELETE_WAIT_S",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_QUEUE_TIMEOUT",
    "EXIT_TIMEOUT",
    "LIFE_MARGIN_S",
    "QUEUE_LINE_EVERY_S",
    "SCRIPT_DIR",
    "WORKDIR",
    "JobSpec",
    "Outcome",
    "Target",
    "env_name",
    "env_request",
    "exec_request",
    "exit_code",
    "guest_path",
    "image_for",
    "job_exit",
    "local_parent",
    "origin_from_env",
    "parse_targets",
    "queue_news",
    "result_word",
]

WORKDIR = "/root/work"
SCRIPT_DIR = "/root/.tt-job"
LIFE_MARGIN_S = 600  # the ENV outlives the command's timeout by this much, then the reaper acts
DELETE_WAIT_S = 600  # how long cleanup waits for an ENV still booting
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_QUEUE_TIMEOUT = 75  # EX_TEMPFAIL (sysexits.h): no VM within --max-wait, nothing ran; retry
QUEUE_LINE_EVERY_S = 30.0  # a waiting target's line: when its place changes, else this often


def parse_targets(oses: str, arches: str | None) -> list[Target]:
    """`--os a,b --arch x,y` -> every combination, in order. An --os word is the one target
    grammar (ttci/model/naming.py): one that names its architecture (`debian-12:arm64`) is
    that target alone; the others pair with every --arch."""
    words = [o.strip() for o in oses.split(",") if o.strip()]
    arch_list = [parse_arch(a) for a in (arches or "").split(",") if a.strip()]
    if not words:
        raise BadInput("--os must name at least one value", hint="--os debian-12 --arch amd64")
    out: list[Target] = []
    for word in words:
        if ":" in word.removeprefix(f"{ENGINES[0]}:"):  # the word names its architecture
            out.append(parse_target(word, what="--os", source="--os"))
            continue
        release, profile = parse_os(word.removeprefix(f"{ENGINES[0]}:"), "--os")
        if not arch_list:
            raise BadInput(
                f"--os {word} names no architecture and --arch is missing",
                hint=f"--os {word} --arch amd64, or --os {word}:amd64",
            )
        out += [
            Target(release, arch, profile or DEFAULT_PROFILE, "--os/--arch") for arch in arch_list
        ]
    return list(dict.fromkeys(out))


def image_for(target: Target, images: list[str]) -> str:
    """The one image that serves a target, or BadInput naming the targets that exist."""
    found = images_serving(target, images)
    if len(found) == 1:
        return found[0]
    have = sorted({t.label for t in image_targets(images).values()})
    raise BadInput(
        f"no image serves --os {target.os} --arch {target.arch.value}"
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


def exit_code(ev: ExecEvent | None) -> int:
    """The job's exit code from the command's final event."""
    st = ev.status if ev is not None else None
    if st is None:
        return EXIT_ERROR
    if st.timed_out:
        return EXIT_TIMEOUT
    if st.signal:
        return 128 + st.signal
    return st.code or 0


def job_exit(outcomes: list[Outcome]) -> int:
    """The exit code of the whole job: the first failing target's (in the given order); a target
    that never got a VM within --max-wait is EXIT_QUEUE_TIMEOUT, another error EXIT_ERROR."""
    failed = [o for o in outcomes if o.error or o.code]
    if not failed:
        return 0
    first = failed[0]
    if first.queue_timeout:
        return EXIT_QUEUE_TIMEOUT
    return EXIT_ERROR if first.error else first.code


def queue_news(last: tuple[int, float] | None, position: int, now: float) -> bool:
    """Whether a target waiting in the queue gets a progress line now: its first queued event,
    a new place in line, or QUEUE_LINE_EVERY_S since the last line. last: (position, when)."""
    return last is None or position != last[0] or now - last[1] >= QUEUE_LINE_EVERY_S


def result_word(code: int, interrupted: bool, error: str) -> JobResult:
    if interrupted:
        return JobResult("cancelled")
    if error:
        return JobResult("error")
    return JobResult("success" if code == 0 else "failed")


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
    max_wait_s: float | None = None  # longest wait in the admission queue (None: no limit)
    allow_egress: tuple[EgressRule, ...] = ()  # what the VM may reach outside (): anything
    egress_audit: bool = False  # block nothing, count what the list would block
    json_out: bool = False  # stdout holds only the JSON summary; the commands' output: stderr
    max_bytes: int = 1 << 30  # the most one artifact may bring back (TT_MAX_FILES)
    cache: CacheSpec | None = None  # every target's VM mounts it; committed when it succeeds


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
    queued_s: float = 0.0  # how long it waited in the admission queue
    queue_timeout: bool = False  # no VM within --max-wait: nothing ran

    @property
    def summary(self) -> str:
        if self.queue_timeout:
            return "no VM within --max-wait (nothing ran)"
        if self.error:
            return f"error: {self.error}"
        if self.code == EXIT_TIMEOUT:
            return "timed out"
        return "ok" if self.code == 0 else f"exit {self.code}"


# -- the requests sent to the scheduler (built here only) ------------------------------------
def env_request(
    spec: JobSpec, target: Target, env: str, image: str, environ: dict[str, str]
) -> EnvRequest:
    """The scheduler's ENV request for one target: one VM of image."""
    return EnvRequest(
        name=env,
        os_prefix=image,
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        disk_gib=spec.disk_gib,
        life_s=spec.timeout_s + LIFE_MARGIN_S,
        origin=origin_from_env(environ, target),
        allow_egress=spec.allow_egress,
        egress_audit=spec.egress_audit,
        cache=spec.cache,
    )


def exec_request(spec: JobSpec, target: Target) -> ExecRequest:
    """The scheduler's exec request that runs the job's command in the target's VM."""
    return ExecRequest(
        tuple(spec.argv),
        cwd=WORKDIR,
        timeout=spec.timeout_s,
        env={
            "CI": "true",
            "TT_JOB_OS": target.os,
            "TT_JOB_ARCH": target.arch.value,
            "HOME": "/root",
        },
    )
