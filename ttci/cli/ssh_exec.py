"""`tt env run --use-ssh`: the command over ssh through each VM's port map for 22, as the same
ExecEvents the scheduler streams (so the CLI prints both the same way)."""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ttci.infra.proc import spawn, stop
from ttci.model.errors import BadInput
from ttci.wire.commands import EventKind, ExecEvent, ExitStatus

__all__ = ["ssh_argv", "ssh_events", "ssh_target"]


def ssh_target(vm: dict[str, Any]) -> tuple[str, int]:
    """(host, port) where the VM's sshd is reached. Pure."""
    for p in vm.get("ports", []):
        if p["vm_port"] == 22 and p["proto"] == "tcp":
            return str(p["host"]), int(p["host_port"])
    raise BadInput(
        f"VM {vm['name']} has no port map for 22",
        hint="create the ENV with --vm-port 22 (and an image with sshd), or drop --use-ssh",
    )


def ssh_argv(host: str, port: int, user: str, key: Path | None, cmd: str) -> list[str]:
    argv = ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
    argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    argv += ["-o", "LogLevel=ERROR"]
    if key:
        argv += ["-i", str(key)]
    return [*argv, f"{user}@{host}", cmd]


def ssh_events(
    env_vms: list[dict[str, Any]],
    names: list[str],
    cmd: str,
    *,
    user: str,
    key: Path | None,
    timeout: float | None,
) -> Iterator[ExecEvent]:
    chosen = [v for v in env_vms if v["name"] in names]
    targets = {v["name"]: ssh_target(v) for v in chosen}  # every VM checked before any runs
    events: queue.Queue[ExecEvent | None] = queue.Queue()

    def pump(vm: str, stream: Any, kind: EventKind) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            events.put(ExecEvent.output(kind, chunk, vm=vm))

    def one(vm: str) -> None:
        host, port = targets[vm]
        proc = spawn(ssh_argv(host, port, user, key, cmd), pipe_stdout=True, pipe_stderr=True)
        readers = [
            threading.Thread(target=pump, args=(vm, proc.stdout, EventKind.STDOUT), daemon=True),
            threading.Thread(target=pump, args=(vm, proc.stderr, EventKind.STDERR), daemon=True),
        ]
        for t in readers:
            t.start()
        try:
            code = proc.wait(timeout=timeout)
            for t in readers:
                t.join()
            events.put(ExecEvent.exit(ExitStatus(code), vm=vm))
        except subprocess.TimeoutExpired:
            stop(proc, grace=0)
            events.put(ExecEvent.exit(ExitStatus(None, timed_out=True, timeout=timeout), vm=vm))
        finally:
            events.put(None)

    for vm in targets:
        threading.Thread(target=one, args=(vm,), daemon=True).start()
    remaining = len(targets)
    while remaining:
        ev = events.get()
        if ev is None:
            remaining -= 1
        else:
            yield ev
