"""Logging: one setup per entry point, secrets masked, `step()` timings for progress."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator

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


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
