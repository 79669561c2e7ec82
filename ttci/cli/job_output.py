"""What `tt job run` prints: the commands' output (raw, or line-prefixed for a matrix),
progress lines and the closing summary table."""

from __future__ import annotations

import sys
import threading
from typing import Any, BinaryIO

from rich.console import Console
from rich.table import Table

from ttci.cli.job_plan import Outcome

__all__ = ["Output", "err", "outcomes_json", "print_summary"]

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class Output:
    """Writes a target's output: raw for one target, line-prefixed for a matrix."""

    def __init__(self, prefix: bool, all_to_stderr: bool = False) -> None:
        self.prefix = prefix
        self.all_to_stderr = all_to_stderr  # --json: stdout is the summary's alone
        self.lock = threading.Lock()
        self.partial: dict[tuple[str, str], bytes] = {}

    def _stream(self, kind: str) -> BinaryIO:
        to_stdout = kind == "stdout" and not self.all_to_stderr
        return sys.stdout.buffer if to_stdout else sys.stderr.buffer

    def write(self, label: str, kind: str, data: bytes) -> None:
        with self.lock:
            out = self._stream(kind)
            if not self.prefix:
                out.write(data)
                out.flush()
                return
            *lines, rest = (self.partial.get((label, kind), b"") + data).split(b"\n")
            self.partial[(label, kind)] = rest
            for line in lines:
                out.write(b"[" + label.encode() + b"] " + line + b"\n")
            out.flush()

    def flush(self, label: str) -> None:
        with self.lock:
            for kind in ("stdout", "stderr"):
                rest = self.partial.pop((label, kind), b"")
                if rest:
                    self._stream(kind).write(b"[" + label.encode() + b"] " + rest + b"\n")
                    self._stream(kind).flush()

    def say(self, label: str, text: str) -> None:
        """A progress line on stderr, never interleaved with a target's output line."""
        with self.lock:
            err.print(f"tt: [{label}] {text}", markup=False)


def print_summary(outcomes: list[Outcome]) -> None:
    t = Table(title="tt job run")
    for col in ("target", "image", "queued", "host", "boot", "run", "result", "artifacts"):
        t.add_column(col, overflow="fold")
    for o in outcomes:
        t.add_row(
            o.target.label,
            o.image,
            f"{o.queued_s:.0f} s" if o.queued_s else "",
            f"{o.host} ({o.accel})" if o.host else "",
            f"{o.boot_s:.1f} s" if o.boot_s else "",
            f"{o.run_s:.1f} s" if o.run_s else "",
            o.summary,
            str(len(o.artifacts)),
        )
    err.print(t)


def outcomes_json(outcomes: list[Outcome], code: int) -> dict[str, Any]:
    """`tt job run --json`: the job's exit code and each target's outcome."""
    return {
        "exit_code": code,
        "targets": [
            {
                "target": o.target.os_prefix,
                "os": o.target.os,
                "arch": o.target.arch.value,
                "env": o.env,
                "image": o.image,
                "host": o.host,
                "accel": o.accel,
                "queued_s": round(o.queued_s, 3),
                "boot_s": round(o.boot_s, 3),
                "run_s": round(o.run_s, 3),
                "exit_code": o.code,
                "result": o.summary,
                "error": o.error,
                "queue_timeout": o.queue_timeout,
                "artifacts": o.artifacts,
            }
            for o in outcomes
        ],
    }
