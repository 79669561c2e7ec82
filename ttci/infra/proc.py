"""The one place that runs subprocesses: argv lists, fixed environment, typed errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from ttci.model.arch import Arch
from ttci.model.errors import CommandFailed, MissingTool

__all__ = [
    "BASE_ENV",
    "KILL_WAIT_S",
    "TOOL_PACKAGES",
    "need",
    "run",
    "run_streaming",
    "spawn",
    "stop",
]

log = logging.getLogger("ttci.infra.proc")

BASE_ENV = {
    # TT_TOOL_PATH lets an operator point at tools installed elsewhere.
    "PATH": os.environ.get(
        "TT_TOOL_PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ),
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
}

# Which Debian package brings each tool we call: used in "missing tool" hints.
TOOL_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "depmod": "kmod",
    "cpio": "cpio",
    "update-binfmts": "binfmt-support",
    **{a.row.qemu_binary: a.row.qemu_package for a in Arch},
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "dnsmasq": "dnsmasq-base",
    "zfs": "zfsutils-linux (kernel OpenZFS) or zfs-fuse",
    "zpool": "zfsutils-linux (kernel OpenZFS) or zfs-fuse",
}


def need(tool: str) -> str:
    """Return the tool's path or raise MissingTool naming the package to install."""
    path = shutil.which(tool, path=BASE_ENV["PATH"])
    if path is None:
        pkg = TOOL_PACKAGES.get(tool, tool)
        raise MissingTool(
            f"{tool} is not installed",
            hint=f"run `make deps` or `apt-get install {pkg}`",
        )
    return path


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(BASE_ENV)
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion, capturing its output.

    Raises:
        CommandFailed: non-zero exit (with check) or timeout; the message quotes stderr's tail.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            env=_env(env),
            cwd=cwd,
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"{shlex.join(args)} timed out after {timeout} s") from e
    except FileNotFoundError as e:
        need(args[0])
        raise CommandFailed(f"{args[0]}: {e}") from e
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-2000:]
        raise CommandFailed(f"{shlex.join(args)} exited with {proc.returncode}: {tail}")
    return proc


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path | None = None,
    pipe_stdout: bool = False,
    pipe_stderr: bool = False,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running child (a VM, a daemon) and return it.

    stdin is /dev/null; stderr, and stdout unless pipe_stdout, are appended to log_path (or
    discarded). The parent's handle on the log file is closed before returning.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s &", shlex.join(args))
    full_env = dict(env) if env is not None else _env(None)
    with contextlib.ExitStack() as stack:
        sink: int | IO[bytes] = subprocess.DEVNULL
        if log_path is not None:
            sink = stack.enter_context(log_path.open("ab"))
        try:
            return subprocess.Popen(
                args,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else sink,
                stderr=subprocess.PIPE if pipe_stderr else sink,
                start_new_session=new_session,
            )
        except FileNotFoundError as e:
            need(args[0])
            raise CommandFailed(f"{args[0]}: {e}") from e


def run_streaming(
    argv: Sequence[str | os.PathLike[str]],
    *,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Run a long command, handing each line of its merged output to on_line (progress).

    The child's process group is stopped if we are interrupted or `cancel` is set, so no build
    outlives its caller (mmdebstrap defers SIGTERM until its current phase ends; what it leaves
    mounted the caller's clean-up unmounts: hostd.images.fs.safe_rmtree).

    Raises:
        CommandFailed: non-zero exit; the message quotes the last lines printed.
        KeyboardInterrupt: cancel was set (the child has been stopped).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            args,
            env=_env(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
    except FileNotFoundError as e:
        need(args[0])
        raise CommandFailed(f"{args[0]}: {e}") from e
    done = threading.Event()
    if cancel is not None:
        threading.Thread(target=_stop_on, args=(cancel, done, proc), daemon=True).start()
    try:
        for raw in proc.stdout or ():
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-19:], line]
            on_line(line)
        rc = proc.wait()
    except BaseException:
        stop(proc, group=True)
        raise
    finally:
        done.set()
        if proc.stdout:
            proc.stdout.close()
    if cancel is not None and cancel.is_set():
        raise KeyboardInterrupt(f"{args[0]} cancelled")
    if rc != 0:
        raise CommandFailed(f"{shlex.join(args)} exited with {rc}:\n" + "\n".join(tail))


def _stop_on(cancel: threading.Event, done: threading.Event, proc: subprocess.Popen[bytes]) -> None:
    """Stop proc's process group as soon as cancel is set (until done is)."""
    while not done.wait(0.2):
        if cancel.is_set():
            stop(proc, group=True)
            return


KILL_WAIT_S = 30.0  # how long a SIGKILLed child may take to be reaped


def stop(proc: subprocess.Popen[bytes], *, grace: float = 10.0, group: bool = False) -> int | None:
    """Stop a child and reap it: the one way every child process is ended.

    SIGTERM, then SIGKILL when it has not exited after grace seconds (grace=0: SIGKILL at once).
    With group=True the signals go to the child's process group (a child started in its own
    session), also when the child itself has already exited but its group lingers.

    Returns:
        The child's exit status, or None when even SIGKILL did not end it in KILL_WAIT_S.
    """
    if not group and proc.poll() is not None:
        return proc.returncode
    steps = [(signal.SIGTERM, grace)] if grace > 0 else []
    for sig, wait in [*steps, (signal.SIGKILL, KILL_WAIT_S)]:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return None
