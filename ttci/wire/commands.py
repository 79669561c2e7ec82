"""Commands in VMs over HTTP: the exec request and the NDJSON event stream that answers it. Pure.

The same request goes from a client to the scheduler (`POST /v1/envs/NAME/run`, with `vms` to
pick some of the ENV's VMs) and from the scheduler to hostd (`POST /v1/vms/ID/exec`). The answer
is one JSON event per line: `start` (hostd only), `stdout`/`stderr` with base64 `data`, then
`exit` (an ExitStatus) or `error`; the scheduler tags each with the VM's name (`vm`).
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ttci.model.errors import BadInput
from ttci.wire.agent_protocol import ExitStatus, ProtocolError
from ttci.wire.api import API_VERSION, check_api, require_object

__all__ = ["MAX_TIMEOUT_S", "EventKind", "ExecEvent", "ExecRequest", "ExitStatus"]

MAX_TIMEOUT_S = 30 * 86400  # an ENV lives 30 days at most


def _argv(d: dict[str, Any]) -> tuple[str, ...]:
    if "cmd" in d:
        if "argv" in d:
            raise BadInput("send cmd or argv, not both", hint='{"cmd": "uname -a"}')
        cmd = d["cmd"]
        if not isinstance(cmd, str) or not cmd.strip():
            raise BadInput("cmd must be a non-empty string", hint="--cmd 'uname -a'")
        return ("/bin/sh", "-c", cmd)
    argv = d.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadInput("argv must be a non-empty list of strings", hint='{"argv": ["uname"]}')
    return tuple(argv)


def _env(d: dict[str, Any]) -> dict[str, str] | None:
    env = d.get("env")
    if env is not None and (
        not isinstance(env, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise BadInput("env must be an object of strings", hint='{"env": {"CI": "true"}}')
    return env


def _cwd(d: dict[str, Any]) -> str | None:
    cwd = d.get("cwd")
    if cwd is not None and not (isinstance(cwd, str) and cwd.startswith("/")):
        raise BadInput("cwd must be an absolute path", hint='{"cwd": "/root"}')
    return cwd


def _timeout(d: dict[str, Any]) -> float | None:
    timeout = d.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT_S  # NaN fails this too
    ):
        raise BadInput(
            f"timeout {timeout!r:.60} is not a positive number of seconds (at most 30 days)",
            hint='{"timeout": 600}',
        )
    return timeout


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadInput(f"{what} must be a base64 string", hint=f"encode {what} with base64")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:  # binascii.Error, or a character that is not ASCII
        raise BadInput(f"{what} is not base64: {e}", hint=f"encode {what} with base64") from e


def _vms(d: dict[str, Any]) -> tuple[str, ...] | None:
    vms = d.get("vms")
    if vms is not None and (not isinstance(vms, list) or not all(isinstance(v, str) for v in vms)):
        raise BadInput("vms must be a list of VM names", hint='e.g. "vms": ["debian-12-amd64"]')
    return None if vms is None else tuple(vms)


@dataclass(frozen=True)
class ExecRequest:
    """A command to run in a VM (or in every VM of an ENV, or in those named by vms)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None  # None: the guest's own environment
    cwd: str | None = None  # None: /
    stdin: bytes | None = None  # None: no stdin at all (/dev/null)
    timeout: float | None = None  # seconds; then the command's process group is killed
    vms: tuple[str, ...] | None = None  # the ENV's VMs to run on (None: every VM)

    @classmethod
    def shell(cls, cmd: str, **kw: Any) -> ExecRequest:
        """`/bin/sh -c cmd`, as `tt env run --cmd` sends it."""
        return cls(("/bin/sh", "-c", cmd), **kw)

    def on_vm(self) -> ExecRequest:
        """The request as one VM's hostd gets it (no ENV-level VM selection)."""
        return replace(self, vms=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"api": API_VERSION, "argv": list(self.argv)}
        if self.env is not None:
            out["env"] = dict(self.env)
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.stdin is not None:
            out["stdin_b64"] = base64.b64encode(self.stdin).decode()
        if self.vms is not None:
            out["vms"] = list(self.vms)
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ExecRequest:
        """Validate an exec request; `cmd` (a shell command) may stand for argv.

        Raises:
            BadInput: naming the field that is wrong and how to write it.
            ApiVersionError: the request is of another API version.
        """
        d = require_object(d, "the exec request")
        check_api(d, "the exec request")
        stdin = d.get("stdin_b64")
        return cls(
            argv=_argv(d),
            env=_env(d),
            cwd=_cwd(d),
            stdin=None if stdin is None else _b64(stdin, "stdin_b64"),
            timeout=_timeout(d),
            vms=_vms(d),
        )


class EventKind(enum.StrEnum):
    START = "start"  # hostd: the command was handed to the agent
    STDOUT = "stdout"
    STDERR = "stderr"
    EXIT = "exit"  # the command ended: status says how
    ERROR = "error"  # the command could not run or its VM was lost: message says why


@dataclass(frozen=True)
class ExecEvent:
    """One event of a command's stream. Only the fields of its kind are set."""

    kind: EventKind
    vm: str = ""  # the VM's name in the ENV (the scheduler's streams)
    data: bytes = b""  # stdout, stderr
    status: ExitStatus | None = field(default=None)  # exit
    message: str = ""  # error
    lost: bool = False  # error: the VM is gone (marked lost)

    @classmethod
    def start(cls) -> ExecEvent:
        return cls(EventKind.START)

    @classmethod
    def output(cls, kind: EventKind | str, data: bytes, vm: str = "") -> ExecEvent:
        kind = EventKind(kind)
        if kind not in (EventKind.STDOUT, EventKind.STDERR):
            raise ValueError(f"{kind} is no output stream")
        return cls(kind, vm=vm, data=data)

    @classmethod
    def exit(cls, status: ExitStatus, vm: str = "") -> ExecEvent:
        return cls(EventKind.EXIT, vm=vm, status=status)

    @classmethod
    def error(cls, message: str, *, lost: bool = False, vm: str = "") -> ExecEvent:
        return cls(EventKind.ERROR, vm=vm, message=message, lost=lost)

    def with_vm(self, vm: str) -> ExecEvent:
        return replace(self, vm=vm)

    @property
    def final(self) -> bool:
        """The last event of a command (exit or error)."""
        return self.kind in (EventKind.EXIT, EventKind.ERROR)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind.value}
        if self.kind in (EventKind.STDOUT, EventKind.STDERR):
            out["data"] = base64.b64encode(self.data).decode()
        elif self.kind is EventKind.EXIT:
            out.update((self.status or ExitStatus()).to_dict())
        elif self.kind is EventKind.ERROR:
            out["message"] = self.message
            out["lost"] = self.lost
        if self.vm:
            out["vm"] = self.vm
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ExecEvent:
        """Raises BadInput for an event that is not one of the kinds above, or malformed."""
        d = require_object(d, "an exec event")
        try:
            kind = EventKind(d.get("event"))
        except ValueError:
            raise BadInput(
                f"exec event kind {d.get('event')!r} is unknown",
                hint=f"one of {', '.join(k.value for k in EventKind)}",
            ) from None
        vm = d.get("vm", "")
        if not isinstance(vm, str):
            raise BadInput(f"exec event vm {vm!r} is not a name", hint='"vm": "debian-12-amd64"')
        if kind in (EventKind.STDOUT, EventKind.STDERR):
            return cls(kind, vm=vm, data=_b64(d.get("data", ""), f"{kind} data"))
        if kind is EventKind.EXIT:
            try:
                return cls(kind, vm=vm, status=ExitStatus.from_dict(d))
            except ProtocolError as e:
                raise BadInput(str(e), hint="code and signal are numbers or null") from None
        if kind is EventKind.ERROR:
            lost = d.get("lost", False)
            if not isinstance(lost, bool):
                raise BadInput(f"exec event lost {lost!r} is not a boolean", hint='"lost": true')
            return cls(kind, vm=vm, message=str(d.get("message", "")), lost=lost)
        return cls(kind, vm=vm)
