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
from tests.pgcluster import leases_held
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

    def held(self) -> set[str]:
        """The leases this replica holds (its /readyz says)."""
        return leases_held(self.url)

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


@contextlib.contextmanager
def never_accepts() -> Iterator[str]:
    """ADDR:PORT of a socket whose accept queue is full: the kernel drops new SYNs, as for a
    machine that is off, so a client waits for its connect timeout."""
    import time

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(3):  # fill the backlog (its size is backlog + 1 here)
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            f.connect_ex(hung.getsockname())
        time.sleep(0.2)
        yield f"127.0.0.1:{hung.getsockname()[1]}"
    finally:
        for f in fillers:
            f.close()
        hung.close()


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


def stream_then_close(lines: list[bytes]) -> Part:
    """An answer delimited by the connection's end (no length, not chunked): lines, then a
    clean close, as a process that dies mid-stream may leave it."""

    def play(c: socket.socket, method: str, path: str) -> None:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n")
        c.sendall(b"Connection: close\r\n\r\n" + b"".join(lines))
        c.shutdown(socket.SHUT_WR)

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


# -- a joined hostd and HAProxy -----------------------------------------------------------------
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "docs" / "operator" / "haproxy.cfg"


@dataclass
class HostdProc:
    proc: subprocess.Popen[bytes]
    addr: str
    token: str
    state: Path

    def vms(self) -> list[dict[str, object]]:
        """hostd's own list of its VMs (what really runs there)."""
        import requests

        r = requests.get(
            f"http://{self.addr}/v1/vms",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        r.raise_for_status()
        out: list[dict[str, object]] = r.json()
        return out


def start_hostd(
    state: Path, join: str, *, cpu_total: float = 2, mem_total: int = 2048
) -> HostdProc:
    """A real hostd (private libvirtd, VMs without a way out) on loopback that joins the
    scheduler(s) at `join` (ADDR:PORT[,ADDR:PORT...])."""
    from tests.conftest import IMAGE_PATH
    from ttci.cli.allinone import _hostd_argv

    listen = f"127.0.0.1:{free_port()}"
    state.mkdir(parents=True, exist_ok=True)
    argv = _hostd_argv(
        state,
        IMAGE_PATH,
        hostd_listen=listen,
        libvirt_uri=None,
        cpu_total=cpu_total,
        mem_total=mem_total,
        allow_outgoing=False,
    )
    argv += ["--join", join]
    token = secrets.token_urlsafe(24)
    env = {**BASE_ENV, "TT_HOSTD_TOKEN": token, "TT_JOIN_TOKEN": JOIN}
    return HostdProc(_spawn(argv, env, state / "hostd.log", "tt-hostd"), listen, token, state)


def haproxy_cfg(listen: str, servers: list[str]) -> str:
    """docs/operator/haproxy.cfg as the operator would fill it in: the frontend's bind address
    and the three `server` lines (s1..s3) pointed at `servers`."""
    text = HAPROXY_CFG.read_text()
    assert text.count("bind 0.0.0.0:7400") == 1
    text = text.replace("bind 0.0.0.0:7400", f"bind {listen}")
    for i, addr in enumerate(servers, 1):
        assert text.count(f"10.0.0.{i}:7400") == 1
        text = text.replace(f"10.0.0.{i}:7400", addr)
    return text


@contextlib.contextmanager
def haproxy(state: Path, servers: list[str]) -> Iterator[str]:
    """Debian's haproxy (in the foreground, -db) running the example config in front of
    `servers`; yields its ADDR:PORT once it accepts connections; stopped afterwards."""
    import time

    listen = f"127.0.0.1:{free_port()}"
    cfg = state / "haproxy.cfg"
    cfg.write_text(haproxy_cfg(listen, servers))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    from ttci.infra.proc import spawn

    proc = spawn(["haproxy", "-db", "-f", str(cfg)], log_path=state / "haproxy.log")
    try:
        deadline = time.monotonic() + 30
        host, port = listen.split(":")
        while True:
            assert proc.poll() is None, (state / "haproxy.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
                break
            assert time.monotonic() < deadline, "haproxy did not listen"
            time.sleep(0.1)
        yield listen
    finally:
        stop(proc, grace=5)


@contextlib.contextmanager
def own_cache(path: Path) -> Iterator[None]:
    """XDG_CACHE_HOME at path while the block runs: the clients' memory of which replica
    answered (ttci/client/failover.py) stays in the test's directory."""
    import os

    was = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = was
