"""One command in the guest (an EXEC) and the port its frames go out on (stdlib only: the
guest agent's own module, copied into every image with ttci/agent/main.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from ttci.wire.agent_protocol import ExitStatus, MsgType, encode_data, encode_json

__all__ = [
    "F_SETPIPE_SZ",
    "KILL_GRACE_S",
    "OUTPUT_GRACE_S",
    "PIPE_SIZE",
    "READ_SIZE",
    "Link",
    "Process",
]

READ_SIZE = 1 << 16
PIPE_SIZE = 1 << 20  # bigger pipes mean fewer, larger frames: throughput under TCG
F_SETPIPE_SZ = 1031
KILL_GRACE_S = 2.0
OUTPUT_GRACE_S = 2.0


class Link:
    """The port: one writer lock, whole frames only."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    time.sleep(0.005)
                    continue
                view = view[n:]

    def send_json(self, mtype: MsgType, channel: int, obj: dict[str, Any]) -> None:
        self.send(encode_json(mtype, channel, obj))


class Process:
    """One command in the guest (an EXEC): its process group, output pumps and exit report."""

    def __init__(self, link: Link, channel: int, req: dict[str, Any]) -> None:
        self.link = link
        self.channel = channel
        self.cancelled = False
        self.timed_out = False
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = req.get("env")
        if env is None:
            env = dict(os.environ)
        elif not isinstance(env, dict):
            raise ValueError("env must be an object of strings")
        timeout = req.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ValueError("timeout must be a positive number of seconds")
        self.timeout = timeout
        self.finished = False
        self.kill_pending = False
        self.stdin_queue: list[bytes | None] = []
        self.stdin_ready = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            env={str(k): str(v) for k, v in env.items()},
            cwd=req.get("cwd") or "/",
            stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pumps = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, MsgType.STDOUT), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, MsgType.STDERR), daemon=True
            ),
        ]
        for t in self.pumps:
            t.start()
        if self.proc.stdin is not None:
            threading.Thread(target=self._feed_stdin, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _pump(self, pipe: Any, mtype: MsgType) -> None:
        fd = pipe.fileno()
        try:
            import fcntl  # noqa: PLC0415 - only needed once a command runs, not at boot

            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            size = PIPE_SIZE
        except OSError:
            size = READ_SIZE
        while True:
            data = os.read(fd, size)
            if not data:
                break
            for frame in encode_data(mtype, self.channel, data):
                self.link.send(frame)
        pipe.close()

    def _wait(self) -> None:
        status = ExitStatus(timeout=self.timeout)
        try:
            try:
                self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.timed_out = True
                self.kill(signal.SIGTERM)
                self.proc.wait()
            # A background child (`server &`) may keep stdout open: the command is over when
            # its leader exits, so wait only a moment for the rest of the output.
            for t in self.pumps:
                t.join(timeout=OUTPUT_GRACE_S)
            rc = self.proc.returncode
            status = ExitStatus(
                code=rc if rc >= 0 else None,
                signal=-rc if rc < 0 else None,
                timed_out=self.timed_out,
                timeout=self.timeout,
                cancelled=self.cancelled,
            )
        finally:
            self.finished = True
            self.link.send_json(MsgType.EXIT, self.channel, status.to_dict())

    def kill(self, sig: int) -> None:
        """Signal the whole process group, then SIGKILL it if it lingers."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        if sig != signal.SIGKILL and not self.kill_pending:  # one timer, however many CANCELs
            self.kill_pending = True
            threading.Timer(KILL_GRACE_S, self._force_kill).start()

    def _force_kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def write_stdin(self, data: bytes | None) -> None:
        """Queue stdin (None: end of input); a thread feeds it, so a command that does not
        read its stdin never blocks the agent's read loop."""
        with self.stdin_ready:
            self.stdin_queue.append(data)
            self.stdin_ready.notify()

    def close_stdin(self) -> None:
        self.write_stdin(None)

    def _feed_stdin(self) -> None:
        pipe = self.proc.stdin
        while pipe is not None:
            with self.stdin_ready:
                while not self.stdin_queue:
                    self.stdin_ready.wait()
                data = self.stdin_queue.pop(0)
            try:
                if data is None:
                    pipe.close()
                    return
                pipe.write(data)
                pipe.flush()
            except (BrokenPipeError, ValueError, OSError):
                try:
                    pipe.close()
                except OSError:
                    pass
                return
