"""Several scheduler replicas behind one client: which URL to try first, and when a failure
lets a request move on to the next.

A request moves to the next URL only when the failure shows the replica did not act on it:
the connection could not be made (refused, DNS, connect timeout: the request never left), or
the replica answered 503 saying it did nothing (Retry-After, or its database is unavailable).
A connection that broke after the request went out (reset, read timeout) moves on only for
requests that may be repeated (GET, HEAD); creating an ENV, pushing files or running a
command may then have happened, so the caller hears that instead. Any other HTTP answer is
the server's decision and is final. The URL that answered last is tried first next time
(sticky), in this process and, through a small cache file, in the next one (the GitLab driver
is one process per stage), so a dead replica costs one failed connect, not one per request.

Standard library only: the GitLab driver's run stream imports it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ttci.model.errors import TTError
from ttci.wire.api import ErrorBody

__all__ = [
    "IDEMPOTENT",
    "MANY_CONNECT_S",
    "RETRYABLE_KINDS",
    "AllFailed",
    "Failure",
    "Servers",
    "Sticky",
    "may_move",
    "retryable_503",
    "rotation",
    "split_servers",
]

T = TypeVar("T")
IDEMPOTENT = frozenset({"GET", "HEAD"})
RETRYABLE_KINDS = frozenset({"DatabaseUnavailable"})  # error kinds a replica did nothing for
MANY_CONNECT_S = 3.0  # connect timeout per URL when there are several: a dead one costs this
_STICKY_KEEP = 32  # URL lists remembered in the cache file


class Failure(enum.Enum):
    CONNECT = "connect"  # no connection: the request never reached a server
    UNAVAILABLE = "unavailable"  # 503 + Retry-After: the replica says it did nothing
    BROKEN = "broken"  # the connection broke after the request went out: it may have acted


def may_move(failure: Failure, idempotent: bool) -> bool:
    """May the request be sent to the next URL after this failure? Pure."""
    return failure is not Failure.BROKEN or idempotent


def retryable_503(status: int, retry_after: str | None, body: bytes = b"") -> bool:
    """An answer that says "not here, not now, nothing done": 503 with Retry-After, or the
    scheduler's DatabaseUnavailable (its database is failing over; the request's transaction
    was rolled back). Another 503, e.g. "host unreachable", is the scheduler's answer about a
    host, which another replica cannot change: final. Pure."""
    if status != 503:
        return False
    return retry_after is not None or ErrorBody.decode(body).kind in RETRYABLE_KINDS


def split_servers(value: str | Sequence[str]) -> tuple[str, ...]:
    """The servers a setting names: a list, or text with commas; blanks and repeats dropped.
    Pure."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(s.strip().rstrip("/") for s in items if s.strip()))


def rotation(urls: Sequence[str], first: str | None) -> list[str]:
    """urls in the order to try: from `first` (the one that answered last) round to the
    others in their configured order; as configured when first is None or unknown. Pure."""
    if first is None or first not in urls:
        return list(urls)
    i = list(urls).index(first)
    return [*urls[i:], *urls[:i]]


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "tt" / "scheduler-urls.json"


class Sticky:
    """Which URL of each list answered last: in memory, and in a cache file (best effort: a
    read-only home only loses the memory across processes)."""

    def __init__(self, path: Path | None = None, *, persist: bool = True) -> None:
        self._path = path
        self._persist = persist  # False: this process's memory only (a daemon)
        self._lock = threading.Lock()
        self._mem: dict[str, str] = {}
        self._loaded = False

    def _file(self) -> Path:
        return self._path or _cache_file()

    def _read(self) -> dict[str, str]:
        if not self._persist:
            return {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self._file().read_text())
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
        return {}

    def first(self, urls: Sequence[str]) -> str | None:
        if len(urls) < 2:
            return None
        key = "\n".join(urls)
        with self._lock:
            if not self._loaded:
                self._mem.update(self._read())
                self._loaded = True
            return self._mem.get(key)

    def remember(self, urls: Sequence[str], url: str) -> None:
        if len(urls) < 2:
            return
        key = "\n".join(urls)
        with self._lock:
            if self._mem.get(key) == url:
                return
            self._mem[key] = url
            if not self._persist:
                return
            data = {k: v for k, v in self._read().items() if k != key}
            data[key] = url  # newest last; the oldest lists fall off
            kept = dict(list(data.items())[-_STICKY_KEEP:])
            with contextlib.suppress(OSError):
                path = self._file()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(kept))
                tmp.replace(path)


STICKY = Sticky()


class AllFailed(TTError):
    """No URL could take the request: each failed in a way that let it move on."""

    def __init__(self, tried: list[tuple[str, BaseException]]) -> None:
        self.tried = tried
        if len(tried) == 1:
            text = f"{tried[0][0]}: {_short(tried[0][1])}"
        else:
            text = "any of " + ", ".join(u for u, _ in tried)
            text += " (" + "; ".join(f"{u}: {_short(e)}" for u, e in tried) + ")"
        super().__init__(
            f"cannot reach the scheduler at {text}",
            hint="is `tt up` (or tt-scheduler) running? see `tt config`",
        )

    @property
    def last(self) -> BaseException:
        return self.tried[-1][1]


def _short(e: BaseException) -> str:
    """The gist of a failure: the OS's words when there are any ("Connection refused")."""
    text = str(getattr(e, "message", "") or e) or type(e).__name__
    if found := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return found.group(1).strip()
    if "timed out" in text:
        return "connect timed out"
    return text if len(text) <= 160 else text[:157] + "..."


class Servers:
    """The scheduler's URLs of one client, tried in sticky order."""

    def __init__(self, urls: Sequence[str], sticky: Sticky | None = None) -> None:
        if not urls:
            raise ValueError("no scheduler URL")
        self.urls = tuple(urls)
        self.sticky = STICKY if sticky is None else sticky

    @property
    def many(self) -> bool:
        return len(self.urls) > 1

    def order(self) -> list[str]:
        return rotation(self.urls, self.sticky.first(self.urls))

    def worked(self, url: str) -> None:
        self.sticky.remember(self.urls, url)

    def call(
        self,
        send: Callable[[str], T],
        failure_of: Callable[[Exception], Failure | None],
        idempotent: bool,
    ) -> T:
        """send(url) on each URL in order until one takes it; the first failure that may not
        move on is raised as it is.

        Raises:
            AllFailed: every URL failed in a way that let the request move on.
        """
        tried: list[tuple[str, BaseException]] = []
        for url in self.order():
            try:
                out = send(url)
            except Exception as e:
                failure = failure_of(e)
                if failure is None or not may_move(failure, idempotent):
                    raise
                tried.append((url, e))
                continue
            self.worked(url)
            return out
        raise AllFailed(tried)
