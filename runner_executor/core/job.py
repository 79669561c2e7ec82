"""What a GitLab job asks of TT CI, decided from its variables alone. Pure: no I/O.

The runner hands the driver every job variable as `CUSTOM_ENV_<KEY>`
(docs/facts/gitlab-custom-executor.md).
From those this module derives the ENV's name, the image (target), the VM's size within the
operator's limits, the `origin` shown to operators, the `config` stage's JSON, the command that
runs a stage's script in the VM, and how a script's end maps to the runner's exit codes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ttci.model.cache import CacheSpec, parse_cache
from ttci.model.egress import parse_egress
from ttci.model.errors import BadInput
from ttci.model.naming import (
    DEFAULT_PROFILE,
    Target,
    image_targets,
    parse_arch,
    parse_os,
    parse_target,
)
from ttci.model.units import parse_cpus, parse_disk_gib, parse_memory_mib
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest
from ttci.wire.envs import EnvRequest
from ttci.wire.queue import WaitOptions, parse_wait_seconds

__all__ = [
    "ARGV_SCRIPT_MAX",
    "BUILDS_DIR",
    "CACHE_DIR",
    "DRIVER_NAME",
    "ENV_PREFIX",
    "GUEST_ENV",
    "ON_FAILURE_STAGES",
    "PGID_FILE",
    "PGID_LINE",
    "QUEUE_LINE_EVERY_S",
    "STAGES",
    "STAGE_DIR",
    "STAGE_WRAPPER",
    "USER_STAGES_RE",
    "ExitCodes",
    "JobError",
    "Limits",
    "Size",
    "StageEnd",
    "Target",
    "config_output",
    "env_name",
    "env_request",
    "is_system_error",
    "job_vars",
    "life_time",
    "origin",
    "pick_image",
    "queue_news",
    "signal_command",
    "size",
    "stage_end",
    "stage_request",
    "target",
    "wait_options",
]

DRIVER_NAME = "tt-ci"
BUILDS_DIR = "/builds"
CACHE_DIR = "/cache"
ENV_PREFIX = "gl-"
# The stage names the runner passes to run_exec, in order (docs and common/build.go). The driver
# runs any name it is given; this list is for docs, tests and the harness.
STAGES = (
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "build_script",
    "after_script",
    "archive_cache",
    "upload_artifacts_on_success",
    "cleanup_file_variables",
)
ON_FAILURE_STAGES = ("archive_cache_on_failure", "upload_artifacts_on_failure")
# Stages whose failure is the user's script failing (the rest are the runner's own plumbing).
USER_STAGES_RE = re.compile(r"^(build_script|step_.*|after_script)$")
# A fixed, sane environment for the stage's shell in the guest: the generated script exports
# every job variable itself, so nothing of the host (or the runner) leaks into the VM.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
}
STAGE_DIR = "/run/tt-gitlab"  # big scripts are stored here
PGID_FILE = "/run/tt-gitlab.pgid"  # /run exists in every image: no mkdir (an exec) needed
# A stage runs as `bash -c SCRIPT tt-stage STAGE`: one exec in the guest (every exec costs
# tens of ms under TCG). The agent starts each command in its own session, so the stage's
# process group id is bash's $$; a builtin echo notes it for a cancel to signal. The runner's
# script traps TERM and exits 1.
PGID_LINE = "{ echo $$ > " + PGID_FILE + "; } 2>/dev/null\n"
ARGV_SCRIPT_MAX = 100_000  # bytes; the kernel caps one argument at 128 KiB
# Larger (or non-UTF-8, or NUL-holding) scripts come on stdin through this wrapper: store,
# note the group, become bash.
STAGE_WRAPPER = (
    "set -e; d=" + STAGE_DIR + '; mkdir -p "$d"; f="$d/script"; '
    'cat > "$f"; chmod 700 "$f"; echo $$ > ' + PGID_FILE + "; "
    'exec bash "$f" < /dev/null'
)


QUEUE_LINE_EVERY_S = 5.0  # while prepare waits in the queue: a job-log line at most this often


def signal_command(sig: str) -> list[str]:
    """argv that sends sig to the running stage's process group in the guest."""
    return [
        "/bin/sh",
        "-c",
        f'p=$(cat {PGID_FILE} 2>/dev/null) && kill -{sig} "-$p" 2>/dev/null; true',
    ]


class JobError(BadInput):
    """The job asked for something impossible (bad variables, unknown target, too big a VM).

    Retrying cannot help, so the driver reports it as a build failure with the reason.
    """


@dataclass(frozen=True)
class ExitCodes:
    """The runner's exit codes, read from the environment (never hard-coded)."""

    build_failure: int = 1
    system_failure: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExitCodes:
        def num(key: str, default: int) -> int:
            try:
                return int(env.get(key, default))
            except ValueError:
                return default

        return cls(num("BUILD_FAILURE_EXIT_CODE", 1), num("SYSTEM_FAILURE_EXIT_CODE", 2))


def job_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The job's variables: `CUSTOM_ENV_X=v` -> {"X": "v"}."""
    p = "CUSTOM_ENV_"
    return {k[len(p) :]: v for k, v in env.items() if k.startswith(p)}


def env_name(jv: Mapping[str, str]) -> str:
    """The ENV of this job: `gl-<CI_JOB_ID>`, so a retried prepare or cleanup finds it."""
    job_id = jv.get("CI_JOB_ID", "").strip()
    if not job_id:
        raise JobError(
            "CUSTOM_ENV_CI_JOB_ID is not set",
            hint="tt-gitlab-executor must be run by gitlab-runner (custom executor), "
            "which passes every job variable as CUSTOM_ENV_*",
        )
    if not re.fullmatch(r"[0-9]{1,30}", job_id):
        raise JobError(f"CI_JOB_ID {job_id!r} is not a number", hint="GitLab job IDs are numbers")
    return f"{ENV_PREFIX}{job_id}"


def origin(jv: Mapping[str, str]) -> dict[str, str]:
    """Where the ENV comes from, shown to operators (`tt env show`, admin page)."""
    out = {"kind": "gitlab", "job": jv.get("CI_JOB_ID", "")}
    if jv.get("CI_JOB_URL", "").startswith(("http://", "https://")):
        out["url"] = jv["CI_JOB_URL"][:500]
    if jv.get("CI_PROJECT_PATH"):
        out["project"] = jv["CI_PROJECT_PATH"][:200]
    runner = jv.get("CI_RUNNER_DESCRIPTION") or jv.get("CI_RUNNER_ID")
    if runner:
        out["runner"] = runner[:200]
    return out


def target(jv: Mapping[str, str], default_arch: str = "amd64") -> Target:
    """The job's target from TT_OS/TT_ARCH (a parallel:matrix sets them) or from `image:`.

    `image:` may be `debian-12:arm64`, `qemu:debian-12:arm64`, `debian-12+systemd:amd64` or
    `debian-12` (default architecture). TT_PROFILE picks a profile with the variables. Both read
    the one target grammar (ttci.model.naming).
    """
    os_var, arch_var = jv.get("TT_OS", "").strip(), jv.get("TT_ARCH", "").strip()
    image = jv.get("CI_JOB_IMAGE", "").strip()
    profile = jv.get("TT_PROFILE", "").strip().lower()
    if os_var or arch_var:
        if not os_var:
            raise JobError(
                f"TT_ARCH is {arch_var!r} but TT_OS is not set",
                hint="set both, e.g. TT_OS: debian-12 and TT_ARCH: arm64",
            )
        t = _job_error(lambda: _from_variables(os_var, arch_var or default_arch))
    elif image:
        t = _job_error(
            lambda: parse_target(image, parse_arch(default_arch), what="image", source="image")
        )
    else:
        raise JobError(
            "the job names no target",
            hint="set the variables TT_OS and TT_ARCH (e.g. in parallel:matrix) "
            "or `image: debian-12:arm64`",
        )
    return replace(t, profile=profile) if profile else t


def _from_variables(os_var: str, arch_var: str) -> Target:
    release, profile = parse_os(os_var, "TT_OS")
    arch = parse_arch(arch_var, hint="e.g. amd64 or arm64", what="TT_ARCH")
    return Target(release, arch, profile or DEFAULT_PROFILE, "TT_OS/TT_ARCH")


def _job_error(parse: Callable[[], Target]) -> Target:
    """A target that does not parse is the job's mistake: a JobError (a build failure)."""
    try:
        return parse()
    except BadInput as e:
        raise JobError(e.message, hint=e.hint) from None


def pick_image(t: Target, images: Iterable[str]) -> str:
    """The pool's image for the target, or a JobError listing what exists."""
    names = sorted(set(images))
    if str(t.image()) in names:
        return str(t.image())
    have = sorted(
        image_targets(names).values(),
        key=lambda i: (i.release, i.profile != DEFAULT_PROFILE, i.profile, i.arch.value),
    )
    exist = ", ".join(h.os_prefix for h in have) or "none (no images built)"
    raise JobError(
        f"no host offers {t.os_prefix} (asked by {t.source})", hint=f"targets that exist: {exist}"
    )


@dataclass(frozen=True)
class Limits:
    """Per-job VM sizes the operator allows (driver flags) and the defaults."""

    cpus: float = 1
    memory_mib: int = 1024
    disk_gib: int = 0  # 0: the image's size
    max_cpus: float = 4
    max_memory_mib: int = 8192
    max_disk_gib: int = 64


@dataclass(frozen=True)
class Size:
    cpus: float
    memory_mib: int
    disk_gib: int


def size(jv: Mapping[str, str], limits: Limits) -> Size:
    """The VM's size from TT_CPUS, TT_MEMORY (MiB, or `2G`) and TT_DISK (GiB, or `20G`), within
    limits; the spelling is ttci/model/units.py's, as for `tt job run --cpus/--memory/--disk`."""
    cpus, mem, disk = limits.cpus, limits.memory_mib, limits.disk_gib
    try:
        if jv.get("TT_CPUS", "").strip():
            cpus = parse_cpus(jv["TT_CPUS"], "TT_CPUS")
        if jv.get("TT_MEMORY", "").strip():
            mem = parse_memory_mib(jv["TT_MEMORY"], "TT_MEMORY")
        if jv.get("TT_DISK", "").strip():
            disk = parse_disk_gib(jv["TT_DISK"], "TT_DISK")
    except BadInput as e:
        raise JobError(e.message, hint=e.hint) from None
    problems = []
    if not 0.1 <= cpus <= limits.max_cpus:
        problems.append(f"TT_CPUS {cpus:g} is outside 0.1..{limits.max_cpus:g}")
    if not 128 <= mem <= limits.max_memory_mib:
        problems.append(f"TT_MEMORY {mem} MiB is outside 128..{limits.max_memory_mib} MiB")
    if not 0 <= disk <= limits.max_disk_gib:
        problems.append(
            f"TT_DISK {disk} GiB is outside 1..{limits.max_disk_gib} GiB (0: image size)"
        )
    if problems:
        raise JobError("; ".join(problems), hint="ask for less; the runner's operator sets limits")
    return Size(cpus, mem, disk)


def life_time(jv: Mapping[str, str], margin_s: int = 900) -> int:
    """Seconds the ENV may live: the job's timeout plus a margin, so the scheduler's reaper
    deletes it even if cleanup_exec never runs."""
    try:
        timeout = int(jv.get("CI_JOB_TIMEOUT", "3600"))
    except ValueError:
        timeout = 3600
    return max(60, min(timeout, 30 * 86400 - margin_s)) + margin_s


def env_request(
    jv: Mapping[str, str], image: str, sz: Size, runner: str | None = None
) -> EnvRequest:
    """The scheduler's ENV request for this job: one VM of image, reaching only what
    TT_ALLOW_EGRESS lists when it is set (TT_EGRESS_AUDIT=true: block nothing, count it);
    TT_COLD=1 boots it cold, never from a snapshot template; TT_CACHE (`KEY:/path`) mounts the
    project's cache KEY (committed by cleanup when the job succeeded)."""
    o = origin(jv)
    if runner:
        o["runner"] = runner[:200]
    try:
        allow = parse_egress(jv.get("TT_ALLOW_EGRESS", ""))
    except BadInput as e:
        raise JobError(f"TT_ALLOW_EGRESS: {e.message}", hint=e.hint) from None
    return EnvRequest(
        name=env_name(jv),
        os_prefix=image,
        cpus=sz.cpus,
        memory_mib=sz.memory_mib,
        disk_gib=sz.disk_gib,
        dup_each=1,
        life_s=life_time(jv),
        origin=o,
        allow_egress=allow,
        egress_audit=_yes(jv.get("TT_EGRESS_AUDIT", "")),
        cold=_yes(jv.get("TT_COLD", "")),  # a truly cold boot (no snapshot template)
        cache=_cache(jv),
    )


def _cache(jv: Mapping[str, str]) -> CacheSpec | None:
    """TT_CACHE: `deps:/cache` (the key is the project's own: gitlab:GROUP/PROJECT)."""
    text = jv.get("TT_CACHE", "").strip()
    try:
        return parse_cache(text) if text else None
    except BadInput as e:
        raise JobError(f"TT_CACHE: {e.message}", hint=e.hint) from None


def _yes(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def wait_options(jv: Mapping[str, str]) -> WaitOptions:
    """How long prepare may wait in TT CI's admission queue: TT_MAX_WAIT (seconds or `30m`,
    `2h`; unset: as long as it takes, within the runner's prepare timeout)."""
    text = jv.get("TT_MAX_WAIT", "").strip()
    if not text:
        return WaitOptions()
    try:
        return WaitOptions(max_wait_s=parse_wait_seconds(text, "TT_MAX_WAIT"))
    except BadInput as e:
        raise JobError(e.message, hint="e.g. TT_MAX_WAIT: 30m (or 1800)") from None


def queue_news(last: tuple[int, float] | None, position: int, now: float) -> bool:
    """Whether a `queued` event becomes a job-log line: the first one, a new place in line, or
    QUEUE_LINE_EVERY_S after the last line. last: (position, when) of the last line."""
    return last is None or position != last[0] or now - last[1] >= QUEUE_LINE_EVERY_S


def config_output(version: str, jv: Mapping[str, str]) -> dict[str, Any]:
    """The `config` stage's JSON (api.ConfigExecOutput). A fresh VM per job: nothing shared."""
    try:
        hostname = env_name(jv)
    except JobError:
        hostname = "tt-ci"
    return {
        "builds_dir": BUILDS_DIR,
        "cache_dir": CACHE_DIR,
        "builds_dir_is_shared": False,
        "hostname": hostname,
        "driver": {"name": DRIVER_NAME, "version": version},
        "job_env": {"TT_GITLAB_DRIVER": version},
        "shell": "bash",
    }


def stage_request(script: bytes, stage: str) -> ExecRequest:
    """The scheduler exec request that runs a stage's script in the VM."""
    text: str | None = None
    if len(script) <= ARGV_SCRIPT_MAX and b"\0" not in script:
        try:
            text = script.decode()
        except UnicodeDecodeError:
            text = None
    if text is not None:
        return ExecRequest(("bash", "-c", PGID_LINE + text, "tt-stage", stage), env=dict(GUEST_ENV))
    return ExecRequest(
        ("/bin/sh", "-c", STAGE_WRAPPER, "tt-stage", stage), env=dict(GUEST_ENV), stdin=script
    )


@dataclass(frozen=True)
class StageEnd:
    """How a stage ended, as the runner must be told."""

    driver_rc: int
    build_exit_code: int | None  # written to BUILD_EXIT_CODE_FILE on build failures
    message: str = ""


def stage_end(event: ExecEvent | None, codes: ExitCodes) -> StageEnd:
    """Map the command's final event (exit or error; None: the stream ended early)."""
    if event is None:
        return StageEnd(codes.system_failure, None, "the VM's output ended without a result")
    if event.kind is EventKind.ERROR or event.status is None:
        lost = " (the VM was lost)" if event.lost else ""
        return StageEnd(codes.system_failure, None, f"{event.message or 'error'}{lost}")
    st = event.status
    if st.signal:
        return StageEnd(
            codes.build_failure, 128 + st.signal, f"the script was killed by signal {st.signal}"
        )
    if st.code == 0:
        return StageEnd(0, None)
    if st.code is not None:
        return StageEnd(codes.build_failure, st.code, f"the script exited with {st.code}")
    return StageEnd(codes.system_failure, None, f"the agent reported no exit code: {st}")


def is_system_error(e: BaseException) -> bool:
    """Our failures (scheduler down, VM lost, bugs): the runner may retry. A request the job
    got wrong (JobError, or the scheduler's 400 BadInput) is the job's failure."""
    return not isinstance(e, BadInput)
