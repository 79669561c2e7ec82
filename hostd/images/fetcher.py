"""A joined hostd fetches the pool's images it lacks, in the background (tt-hostd serve
--fetch-images): it asks the scheduler which images the pool has that this host does not
(GET /v1/hosts/ID/images/missing, bearing its own token), and pulls them through the scheduler
one at a time, images of its own architecture first, paced to --fetch-rate. An image that fails
is tried again later (backing off); one an admin asks for (`tt image push`) goes first. Each
verified image is in the catalogue at once, and `on_added` lets the joiner report it now.
"""

from __future__ import annotations

import collections
import logging
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.images.sources import HttpSource, TransferError
from hostd.images.transfer import Progress, pull
from ttci.model.errors import BadInput, TTError
from ttci.model.naming import ImageName, select_by_prefix

__all__ = ["Fetcher", "PoolSource", "Wanted", "order_wanted"]

log = logging.getLogger("hostd.images.fetcher")
BACKOFF_S = (30.0, 60.0, 300.0, 1800.0)  # after 1, 2, 3, 4+ failures of one image


class PoolSource(HttpSource):
    """The scheduler as this host's image source: it answers as this host (X-TT-Host and the
    host's own token), never with another host's address or token."""

    def __init__(self, scheduler: str, host_id: str, host_token: str, verify: str | bool) -> None:
        super().__init__(
            scheduler,
            {"Authorization": f"Bearer {host_token}", "X-TT-Host": host_id},
            verify=verify,
        )
        self.host_id = host_id
        self.where = f"the scheduler at {self.url}"

    def missing(self) -> list[dict[str, Any]]:
        """The pool's images this host lacks: [{name, digest, bytes, arch, hosts}]."""
        out = self.get_json(f"/v1/hosts/{self.host_id}/images/missing")
        if not isinstance(out, list):
            raise TransferError(f"{self.where} answered no list of images")
        return [i for i in out if isinstance(i, dict) and isinstance(i.get("name"), str)]


@dataclass(frozen=True)
class Wanted:
    name: str
    digest: str = ""
    asked: bool = False  # an admin asked for it (tt image push): fetched even with auto off


def order_wanted(missing: list[dict[str, Any]], want: str, machine: str = "") -> list[Wanted]:
    """Which of the pool's missing images to fetch, in order: those `want` selects (all, none
    or name prefixes), this host's native architectures first, then by name. Pure."""
    if want in ("", "none"):
        return []
    names = [str(i["name"]) for i in missing]
    chosen = set(names) if want == "all" else set(select_by_prefix(names, want))
    machine = machine or platform.machine()

    def key(i: dict[str, Any]) -> tuple[bool, str]:
        try:
            native = ImageName.parse(str(i["name"])).arch.is_native(machine)
        except BadInput:
            native = False
        return (not native, str(i["name"]))

    return [
        Wanted(str(i["name"]), str(i.get("digest") or ""))
        for i in sorted(missing, key=key)
        if i["name"] in chosen
    ]


class Fetcher:
    def __init__(
        self,
        image_path: Path,
        source: PoolSource,
        *,
        want: str = "all",
        rate: float = 0,
        on_added: Callable[[], None] | None = None,
        interval: float = 30.0,
    ) -> None:
        self.image_path = image_path
        self.source = source
        self.want = want
        self.rate = rate
        self.on_added = on_added or (lambda: None)
        self.interval = interval
        self.current: Progress | None = None
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (count, not before)
        self._asked: collections.OrderedDict[str, Wanted] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="image-fetcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def ask(self, name: str, digest: str = "") -> None:
        """Fetch this image next (an admin's `tt image push`), even with auto-fetch off."""
        canonical = str(ImageName.parse(name))
        with self._lock:
            self._asked[canonical] = Wanted(canonical, digest, asked=True)
            self._failures.pop(canonical, None)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            cur = self.current
            return {
                "auto": self.want or "none",
                "rate_mib_s": self.rate / (1 << 20),
                "current": None
                if cur is None
                else {
                    "image": cur.image,
                    "file": cur.file,
                    "done": cur.done,
                    "total": cur.total,
                    "rate_mib_s": round(cur.rate / (1 << 20), 1),
                },
                "asked": list(self._asked),
                "recent": list(self.recent),
            }

    def _todo(self) -> list[Wanted]:
        with self._lock:
            asked = list(self._asked.values())
        auto = order_wanted(self.source.missing(), self.want) if self.want != "none" else []
        now = time.monotonic()
        out, seen = [], set()
        for w in [*asked, *auto]:
            _, not_before = self._failures.get(w.name, (0, 0.0))
            if w.name in seen or (not w.asked and now < not_before):
                continue
            seen.add(w.name)
            out.append(w)
        return out

    def _loop(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                todo = self._todo()
                first = False
            except TTError as e:
                log.debug("cannot list the pool's images yet: %s", e)
                todo = []
            for w in todo:
                if self._stop.is_set():
                    return
                self._one(w)
            self._wake.wait(2.0 if first else self.interval)
            self._wake.clear()

    def _progress(self, p: Progress) -> None:
        with self._lock:
            shown = self.current
            self.current = p
        if (
            shown is None
            or p.file != shown.file
            or int(p.done * 10 / p.total) != int(shown.done * 10 / p.total)
        ):
            log.info(
                "fetching %s: %s, %d of %d MiB (%.1f MiB/s)",
                p.image,
                p.file,
                p.done >> 20,
                p.total >> 20,
                p.rate / (1 << 20),
            )

    def _one(self, w: Wanted) -> None:
        log.info("fetching %s from %s%s", w.name, self.source.where, " (asked)" if w.asked else "")
        entry: dict[str, Any] = {"name": w.name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            result = pull(
                self.image_path, w.name, self.source, digest=w.digest, rate=self.rate,
                on_progress=self._progress,
            )  # fmt: skip
            entry.update(ok=True, **result.to_dict())
            with self._lock:
                self._failures.pop(w.name, None)
        except (TTError, OSError) as e:
            message = e.message if isinstance(e, TTError) else str(e)
            entry.update(ok=False, error=message)
            with self._lock:
                count = self._failures.get(w.name, (0, 0.0))[0] + 1
                delay = BACKOFF_S[min(count, len(BACKOFF_S)) - 1]
                self._failures[w.name] = (count, time.monotonic() + delay)
            log.warning("fetching %s failed (again in %.0f s): %s", w.name, delay, message)
        finally:
            with self._lock:
                self.current = None
                if self._asked.get(w.name) == w:
                    del self._asked[w.name]
            self.recent.appendleft(entry)
        if entry["ok"] and not entry.get("already"):
            try:
                self.on_added()
            except Exception:  # the next heartbeat reports it anyway
                log.exception("reporting the new image failed")
