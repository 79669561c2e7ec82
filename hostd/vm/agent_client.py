"""Host side of the agent protocol: connect to a VM's port, exec commands, stream their output."""

from __future__ import annotations

import contextlib
import itertools
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttci.model.errors import AgentError, BootError
from ttci.wire.agent_protocol import (
    CONTROL,
    IDENTITY_FEATURE,
    Decoder,
    ExitStatus,
    Frame,
    MsgType,
    ProtocolError,
    chosen,
    encode,
    encode_data,
    encode_json,
    exec_payload,
    offer,
)

__all__ = ["AgentClient", "ExitStatus", "OutputFn"]

OutputFn = Callable[[bytes], None]


@dataclass
class _Call:
    frames: queue.Queue[Frame | None]


class AgentClient:
    """One authenticated session with one guest agent; several commands may run at once."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any]) -> None:
        self._sock = sock
        self.hello = hello
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: Path, *, token: str | None = None, timeout: float = 60.0) -> AgentClient:
        """Connect and say HELLO until the agent answers (it starts during boot).

        Raises:
            BootError: no answer within timeout.
            AgentError: the agent refused us (wrong token or protocol version).
        """
        deadline = time.monotonic() + timeout
        last_err = "socket never appeared"
        while time.monotonic() < deadline:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
            except OSError as e:
                last_err = str(e)
                sock.close()
                time.sleep(0.02)
                continue
            try:
                return cls(sock, _handshake(sock, token, deadline))
            except TimeoutError:
                last_err = "connected, but no answer to HELLO"
                sock.close()
                break
            except AgentError:
                sock.close()  # refused (wrong token): say so, and leak no socket
                raise
            except (OSError, ProtocolError) as e:
                last_err = str(e)
                sock.close()
                time.sleep(0.05)
        raise BootError(f"agent at {path} did not answer within {timeout:.0f} s ({last_err})")

    def _send(self, data: bytes) -> None:
        try:
            with self._lock:
                self._sock.sendall(data)
        except OSError as e:
            raise AgentError(f"connection to the agent was lost: {e.strerror or e}") from e

    def _read_loop(self) -> None:
        decoder = Decoder()
        try:
            while True:
                data = self._sock.recv(1 << 20)
                if not data:
                    break
                for frame in decoder.feed(data):
                    call = self._calls.get(frame.channel)
                    if call is not None:
                        call.frames.put(frame)
        except (OSError, ProtocolError):
            pass
        self._closed = True
        for call in list(self._calls.values()):
            call.frames.put(None)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> ExitStatus:
        """Run argv in the guest, streaming output to the callbacks as it arrives.

        Raises:
            AgentError: the agent could not start the command, sent a malformed EXIT, or the
                connection was lost.
        """
        channel = next(self._ids)
        call = _Call(queue.Queue())
        self._calls[channel] = call
        try:
            payload = exec_payload(argv, env=env, cwd=cwd, stdin=stdin is not None, timeout=timeout)
            self._send(encode_json(MsgType.EXEC, channel, payload))
            if on_start:
                on_start(channel)
            if stdin is not None:
                for frame in encode_data(MsgType.STDIN, channel, stdin) if stdin else []:
                    self._send(frame)
                self._send(encode(MsgType.STDIN_EOF, channel))
            return self._wait(call, argv[0], on_stdout, on_stderr)
        finally:
            self._calls.pop(channel, None)

    def _wait(
        self, call: _Call, what: str, on_stdout: OutputFn | None, on_stderr: OutputFn | None
    ) -> ExitStatus:
        """Hand the command's output to the callbacks until its EXIT (or ERROR) comes."""
        while True:
            if self._closed and call.frames.empty():
                raise AgentError(f"connection to the agent was lost while running {what}")
            item = call.frames.get()
            if item is None:
                raise AgentError(f"connection to the agent was lost while running {what}")
            if item.type is MsgType.STDOUT and on_stdout:
                on_stdout(item.payload)
            elif item.type is MsgType.STDERR and on_stderr:
                on_stderr(item.payload)
            elif item.type is MsgType.EXIT:
                return _exit_status(item)
            elif item.type is MsgType.ERROR:
                raise AgentError(f"agent refused {what}: {item.json().get('message')}")

    @property
    def knows_identity(self) -> bool:
        """Whether the agent accepts IDENTITY (images built before warm start do not)."""
        return IDENTITY_FEATURE in (self.hello.get("features") or [])

    def identity(self, payload: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        """Give a restored clone its identity (an identity_payload); the agent then ends this
        session, and only payload's token opens the next one.

        Raises:
            AgentError: the agent does not know IDENTITY, refused it, or did not answer.
        """
        if not self.knows_identity:
            raise AgentError("the agent does not know IDENTITY (an image built before warm start)")
        channel = next(self._ids)
        call = _Call(queue.Queue())
        self._calls[channel] = call
        try:
            self._send(encode_json(MsgType.IDENTITY, channel, payload))
            try:
                item = call.frames.get(timeout=timeout)
            except queue.Empty:
                raise AgentError(f"the agent did not apply its identity in {timeout:g} s") from None
            if item is None:
                raise AgentError("connection to the agent was lost while giving it its identity")
            if item.type is MsgType.IDENTITY_OK:
                return item.json()
            if item.type is MsgType.ERROR:
                raise AgentError(f"the agent refused its identity: {item.json().get('message')}")
            raise AgentError(f"unexpected {item.type.name} in answer to IDENTITY")
        finally:
            self._calls.pop(channel, None)

    def cancel(self, channel: int, signal: int = 15) -> None:
        """Signal a running command's process group (SIGTERM, then SIGKILL after a grace)."""
        with contextlib.suppress(AgentError):
            self._send(encode_json(MsgType.CANCEL, channel, {"signal": signal}))

    @property
    def closed(self) -> bool:
        return self._closed

    def output(self, argv: Sequence[str], **kw: Any) -> tuple[ExitStatus, bytes, bytes]:
        out: list[bytes] = []
        err: list[bytes] = []
        status = self.exec(argv, on_stdout=out.append, on_stderr=err.append, **kw)
        return status, b"".join(out), b"".join(err)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=2)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_status(frame: Frame) -> ExitStatus:
    try:
        return ExitStatus.from_dict(frame.json())
    except ProtocolError as e:
        raise AgentError(f"the agent's exit report is malformed: {e}") from e


def _handshake(sock: socket.socket, token: str | None, deadline: float) -> dict[str, Any]:
    """Send HELLO every half second until HELLO_OK with our nonce comes back."""
    nonce = secrets.token_hex(8)
    decoder = Decoder()
    next_hello = 0.0
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError
        if now >= next_hello:
            hello = {
                **offer(),  # protocol 1 for old images, the highest both speak for others
                "token": token or "",
                "time": time.time(),
                "nonce": nonce,
            }
            sock.sendall(encode_json(MsgType.HELLO, CONTROL, hello))
            next_hello = now + 0.5
        sock.settimeout(max(0.01, min(next_hello, deadline) - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        finally:
            sock.settimeout(None)
        if not data:
            raise OSError("agent socket closed")
        for frame in decoder.feed(data):
            if frame.type is MsgType.ERROR:
                raise AgentError(f"agent refused the session: {frame.json().get('message')}")
            if frame.type is MsgType.HELLO_OK:
                body = frame.json()
                if body.get("nonce") == nonce:
                    if chosen(body) is None:
                        raise AgentError(
                            f"the agent chose protocol {body.get('version')!r}, which this "
                            "host does not speak",
                            hint="upgrade the host (or rebuild the image)",
                        )
                    return body
