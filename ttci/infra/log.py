"""Logging: one setup per entry point, secrets masked, `step()` timings for progress."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["CONTEXT_KEYS", "JsonFormatter", "MaskingFormatter", "mask", "setup_logging", "step"]

_SECRET_RE = re.compile(
    r"(?P<key>(?:token|secret|password|jitconfig|jit_config|authorization)[\"']?\s*[:=]\s*[\"']?"
    r"(?:bearer\s+)?)(?P<value>[^\s\"',}]+)",
    re.IGNORECASE,
)
_KNOWN_SECRET_RE = re.compile(r"\b(glrt-|ghp_|ghs_|github_pat_)[A-Za-z0-9_\-]+")


def mask(text: str) -> str:
    """Replace anything that looks like a secret with ***."""
    text = _SECRET_RE.sub(lambda m: m.group("key") + "***", text)
    return _KNOWN_SECRET_RE.sub(lambda m: m.group(1) + "***", text)


# Context a record may carry (`log.info(..., extra={"vm": ..., "env": ...})`).
CONTEXT_KEYS = ("host", "env", "vm", "image", "job")


def _context(record: logging.LogRecord) -> dict[str, str]:
    return {k: str(getattr(record, k)) for k in CONTEXT_KEYS if hasattr(record, k)}


class MaskingFormatter(logging.Formatter):
    """Text lines: time, level, logger, the context as key=value, the message; secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = super().format(record)
        if ctx:
            head, sep, msg = line.partition(": ")
            line = f"{head}: [{ctx}] {msg}" if sep else f"[{ctx}] {line}"
        return mask(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (TT_LOG_FORMAT=json): for log shippers; secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return mask(json.dumps(out, ensure_ascii=False))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (not the stream of the moment it
    was made): a daemon thread still logging after its caller swapped or closed stderr (a test
    harness capturing it, say) writes to the live one instead of failing on a closed file."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        """StreamHandler sets it; the live sys.stderr is always used."""


def setup_logging(verbose: bool = False) -> None:
    handler = _StderrHandler()
    if os.environ.get("TT_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def step(log: logging.Logger, what: str) -> Iterator[None]:
    """Log the start and the duration of a step."""
    log.info("%s ...", what)
    t0 = time.monotonic()
    try:
        yield
    except BaseException:
        log.info("%s failed after %.1f s", what, time.monotonic() - t0)
        raise
    log.info("%s done in %.1f s", what, time.monotonic() - t0)
