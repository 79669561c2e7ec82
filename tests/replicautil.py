"""Helpers for the failover and replica tests: real tt-scheduler processes on loopback, a port
where nothing listens, and a scripted stand-in server for the failures a real scheduler cannot
be made to show on cue (a connection cut mid-stream, a reset before the answer)."""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.cloudutil import free_port
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop

ADMIN = "admin-" + secrets.token_urlsafe(16)
JOIN = "join-" + secrets.token_urlsafe(16)


def dead_port() -> int:
    """A loopback port nobody listens on (connects are refused)."""
    return free_port()


@dataclass
class SchedulerProc:
    """One tt-scheduler process (a replica when several share a database)."""

    port: int
    state: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the replica dies mid-whatever, as a crashed machine's would."""
        stop(self.proc, grace=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop(self.proc, grace=STOP_GRACE_S)


def start_scheduler(
    state: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None
) -> SchedulerProc:
    """tt-scheduler on 127.0.0.1 (a free port unless given), its log at state/scheduler-PORT.log;
    returns once it said "ready on"."""
    port = port or free_port()
    state.mkdir(parents=True, exist_ok=True)
    argv = [
        *python_main("ttci.scheduler.web.serve"),
        *("--listen", f"127.0.0.1:{port}", "--state-dir", str(state), *extra),
    ]
    full = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN, **(env or {})}
    proc = _spawn(argv, full, state / f"scheduler-{port}.log", "tt-scheduler")
    return SchedulerProc(port, state, proc)


# -- the stand-in ------------------------------------------------------------------------------
Part = Callable[[socket.socket, str, str], None]  # (connection, method, path): plays one answer


def answer(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> Part:
    def play(c: socket.socket, method: str, path: str) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        head += "Content-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        c.sendall(head.encode() + b"\r\n" + body)

    return play


def reset(c: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees "connection reset"."""
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def cut_before_answer(c: socket.socket, method: str, path: str) -> None:
    reset(c)


def stream_then_cut(lines: list[bytes]) -> Part:
    """Start a chunked NDJSON answer, send lines, then reset the connection mid-stream."""

    def play(c: socket.socket, method: str, path: str) -> None:
        c.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for line in lines:
            c.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        reset(c)

    return play


@dataclass
class Standin:
    """A loopback HTTP server that plays `part` for every request and records (method,
    path) of each. No DNS lookups, one thread per connection."""

    part: Part
    seen: list[tuple[str, str]] = field(default_factory=list)
    sock: socket.socket = field(default_factory=socket.socket)

    def __post_init__(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = self.sock.accept()
                threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        with contextlib.suppress(OSError), c:
            data = b""
            while b"\r\n\r\n" not in data:
                more = c.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next(
                (
                    int(v)
                    for k, _, v in (h.partition(":") for h in lines[1:])
                    if k.strip().lower() == "content-length"
                ),
                0,
            )
            while len(body) < length:
                more = c.recv(65536)
                if not more:
                    break
                body += more
            self.seen.append((method, path))
            self.part(c, method, path)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def standin(part: Part) -> Iterator[Standin]:
    s = Standin(part)
    try:
        yield s
    finally:
        s.close()
