"""Host side of the agent protocol: connect to a VM's port, exec commands, stream their output.

A guest is untrusted. Its frames are checked as they arrive: a frame the protocol does not allow
(bad magic or version, an oversize length, an unknown type, a host's message, bad JSON in a
control frame, a channel never opened, a malformed EXIT) ends that session with the reason
(`error`) and never disturbs anything else of hostd's. Output is bounded: each command holds at
most CHANNEL_BUFFER bytes waiting for its reader; past that the session stops reading the port
(the guest's writes block) until the reader catches up, so a guest flooding stdout at a slow
reader costs the host at most CHANNEL_BUFFER + one frame per command, plus one frame being
decoded.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ttci.model.errors import AgentError, BootError
from ttci.wire.agent_protocol import (
    CONTROL,
    IDENTITY_FEATURE,
    JSON_TYPES,
    MAX_PAYLOAD,
    Decoder,
    ExitStatus,
    Frame,
    MsgType,
    ProtocolError,
    chosen,
    encode,
    encode_json,
    exec_payload,
    offer,
)

__all__ = ["CHANNEL_BUFFER", "AgentClient", "ExitStatus", "OutputFn", "OutputTooLarge"]

OutputFn = Callable[[bytes], None]
log = logging.getLogger("hostd.vm.agent_client")
CHANNEL_BUFFER = 4 << 20  # bytes of one command's output that may wait for its reader
READ_SIZE = 1 << 20
# What a guest may send; the others are the host's.
_GUEST_TYPES = frozenset(
    {
        MsgType.HELLO_OK,
        MsgType.STDOUT,
        MsgType.STDERR,
        MsgType.EXIT,
        MsgType.ERROR,
        MsgType.PONG,
        MsgType.IDENTITY_OK,
    }
)


class OutputTooLarge(AgentError):
    """A command's output passed the caller's max_output (the command was killed)."""


class _Call:
    """One channel's frames on their way to its caller: at most CHANNEL_BUFFER bytes queued."""

    def __init__(self) -> None:
        self.frames: queue.Queue[Frame | None] = queue.Queue()
        self.room = threading.Condition()
        self.buffered = 0
        self.left = False  # its caller is gone: nothing waits for room any more

    def put(self, frame: Frame, stopping: Callable[[], bool]) -> None:
        """From the reader: wait (not reading the port meanwhile) while the buffer is full."""
        with self.room:
            while self.buffered >= CHANNEL_BUFFER and not self.left and not stopping():
                self.room.wait(0.5)
            if self.left:
                return
            self.buffered += len(frame.payload)
        self.frames.put(frame)

    def get(self, timeout: float | None = None) -> Frame | None:
        item = self.frames.get(timeout=timeout)
        if item is not None:
            with self.room:
                self.buffered -= len(item.payload)
                self.room.notify_all()
        return item

    def leave(self) -> None:
        with self.room:
            self.left = True
            self.room.notify_all()


class AgentClient:
    """One authenticated session with one guest agent; several commands may run at once."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any]) -> None:
        self._sock = sock
        self.hello = hello
        self._lock = threading.Lock()  # sends
        self._calls_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._opened = 0  # the highest channel handed out
        self._closed = False
        self.error = ""  # why the session ended ("" while it lives, or after close())
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
        why = "the agent closed the connection"
        try:
            while not self._closed:
                data = self._sock.recv(READ_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._dispatch(frame)
        except ProtocolError as e:
            why = f"the agent broke the protocol: {e}"
            log.warning("agent session ended: %s", why)
        except OSError as e:
            why = f"the agent's connection failed: {e.strerror or e}"
        except Exception as e:  # a bug here must end this session only, never hostd
            why = f"the agent's session failed: {e!r}"
            log.exception("agent session ended")
        self.error = self.error or why
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._calls_lock:
            calls = list(self._calls.values())
        for call in calls:
            call.frames.put(None)

    def _dispatch(self, frame: Frame) -> None:
        """Hand a frame to its channel's caller, or ProtocolError (which ends the session)."""
        kind = frame.type
        body: dict[str, Any] = {}
        if kind not in _GUEST_TYPES:
            raise ProtocolError(f"{kind.name} is the host's message, not the guest's")
        if kind in JSON_TYPES:
            body = frame.json()  # ProtocolError: not a JSON object
            if kind is MsgType.EXIT:
                ExitStatus.from_dict(body)  # ProtocolError: a field of the wrong type
        if frame.channel == CONTROL:
            if kind is MsgType.ERROR:  # it could not read what we sent: nothing works now
                raise ProtocolError(f"the agent reports {str(body.get('message'))[:200]!r}")
            if kind in (MsgType.HELLO_OK, MsgType.PONG):
                return  # an answer to a repeated HELLO of the handshake
            raise ProtocolError(f"{kind.name} on the control channel")
        with self._calls_lock:
            call = self._calls.get(frame.channel)
            opened = self._opened
        if frame.channel > opened:
            raise ProtocolError(f"{kind.name} on channel {frame.channel}, which was never opened")
        if call is not None:  # else: a finished command's (output of a background child)
            call.put(frame, lambda: self._closed)

    def _open(self) -> tuple[int, _Call]:
        call = _Call()
        with self._calls_lock:
            channel = next(self._ids)
            self._calls[channel] = call
            self._opened = channel
        if self._closed:  # checked after: a reader ending now has this call in its list
            self._end(channel)
            raise AgentError(f"the session with the agent is over: {self.error or 'closed'}")
        return channel, call

    def _end(self, channel: int) -> None:
        with self._calls_lock:
            call = self._calls.pop(channel, None)
        if call is not None:
            call.leave()

    def _lost(self, what: str) -> AgentError:
        return AgentError(
            f"connection to the agent was lost while {what}"
            + (f" ({self.error})" if self.error else "")
        )

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
        timeout: float | None = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
        on_start: Callable[[int], None] | None = None,
        max_output: int | None = None,
    ) -> ExitStatus:
        """Run argv in the guest, streaming output to the callbacks as it arrives. stdin: bytes,
        or chunks (sent as they come: an error while producing them kills the command).

        Raises:
            AgentError: the agent could not start the command, sent a malformed EXIT, or the
                connection was lost.
            OutputTooLarge: stdout and stderr passed max_output bytes (the command is killed).
        """
        channel, call = self._open()
        try:
            payload = exec_payload(argv, env=env, cwd=cwd, stdin=stdin is not None, timeout=timeout)
            self._send(encode_json(MsgType.EXEC, channel, payload))
            if on_start:
                on_start(channel)
            if stdin is not None:
                self._send_stdin(channel, [stdin] if isinstance(stdin, bytes) else stdin)
            return self._wait(
                call,
                channel,
                argv[0],
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                max_output=max_output,
            )
        finally:
            self._end(channel)

    def _send_stdin(self, channel: int, chunks: Iterable[bytes]) -> None:
        try:
            for chunk in chunks:
                for i in range(0, len(chunk), MAX_PAYLOAD):
                    self._send(encode(MsgType.STDIN, channel, chunk[i : i + MAX_PAYLOAD]))
        except BaseException:
            self.cancel(channel, 9)  # half an input: the command must not act on it
            raise
        self._send(encode(MsgType.STDIN_EOF, channel))

    def _wait(
        self,
        call: _Call,
        channel: int,
        what: str,
        *,
        on_stdout: OutputFn | None,
        on_stderr: OutputFn | None,
        max_output: int | None,
    ) -> ExitStatus:
        """Hand the command's output to the callbacks until its EXIT (or ERROR) comes."""
        seen = 0
        while True:
            item = call.get()
            if item is None:
                raise self._lost(f"running {what}")
            if item.type in (MsgType.STDOUT, MsgType.STDERR):
                seen += len(item.payload)
                if max_output is not None and seen > max_output:
                    self.cancel(channel, 9)
                    raise OutputTooLarge(
                        f"{what} in the VM sent more than {max_output} bytes; it was stopped",
                        hint="ask for less, or raise the limit (--max-files)",
                    )
                fn = on_stdout if item.type is MsgType.STDOUT else on_stderr
                if fn:
                    fn(item.payload)
            elif item.type is MsgType.EXIT:
                return ExitStatus.from_dict(item.json())  # checked by _dispatch
            elif item.type is MsgType.ERROR:
                raise AgentError(f"agent refused {what}: {item.json().get('message')}")
            else:
                raise AgentError(f"unexpected {item.type.name} while running {what}")

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
        channel, call = self._open()
        try:
            self._send(encode_json(MsgType.IDENTITY, channel, payload))
            try:
                item = call.get(timeout=timeout)
            except queue.Empty:
                raise AgentError(f"the agent did not apply its identity in {timeout:g} s") from None
            if item is None:
                raise self._lost("giving it its identity")
            if item.type is MsgType.IDENTITY_OK:
                return item.json()
            if item.type is MsgType.ERROR:
                raise AgentError(f"the agent refused its identity: {item.json().get('message')}")
            raise AgentError(f"unexpected {item.type.name} in answer to IDENTITY")
        finally:
            self._end(channel)

    def cancel(self, channel: int, signal: int = 15) -> None:
        """Signal a running command's process group (SIGTERM, then SIGKILL after a grace)."""
        with contextlib.suppress(AgentError):
            self._send(encode_json(MsgType.CANCEL, channel, {"signal": signal}))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes of output waiting for their readers now (all commands)."""
        with self._calls_lock:
            calls = list(self._calls.values())
        return sum(c.buffered for c in calls)

    def output(self, argv: Sequence[str], **kw: Any) -> tuple[ExitStatus, bytes, bytes]:
        out: list[bytes] = []
        err: list[bytes] = []
        status = self.exec(argv, on_stdout=out.append, on_stderr=err.append, **kw)
        return status, b"".join(out), b"".join(err)

    def close(self) -> None:
        self.error = self.error or "the host closed the session"
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=2)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handshake(sock: socket.socket, token: str | None, deadline: float) -> dict[str, Any]:
    """Send HELLO every half second until HELLO_OK with our nonce comes back. The first HELLO
    after a boot provisions the agent with the token (ttci/agent/main.py)."""
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
