"""Spare copies of the templates' save files, made in the background.

A clone is restored from its own copy of its template's save file (its header carries the
clone's domain XML): copying ~100 MB took 40-130 ms of every warm start, four at once in a
4-VM ENV. hostd keeps `SPARES` whole copies next to each template in use; a clone takes one
with a rename and rewrites only its header (hostd.vm.warm.claim_spare), and this thread makes
the next at the lowest CPU priority (nice 19). A clone that finds none copies as before.
Half-made copies are `.part` files: `reap_parts` removes those a killed hostd left.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

from hostd.vm.warm import make_spare, spares
from ttci.model.errors import TTError

__all__ = ["SPARES", "Spares", "reap_parts"]

log = logging.getLogger("hostd.vm.spares")
SPARES = 4  # a 4-VM ENV restores all its clones without a copy on its way


class Spares:
    """The spare copies of each template directory wanted, made one at a time."""

    def __init__(self, keep: int = SPARES) -> None:
        self.keep = keep
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def want(self, template_dir: Path) -> None:
        """Top template_dir up to `keep` spares, soon."""
        with self._lock:
            if self.keep <= 0 or self._stop.is_set() or template_dir in self._pending:
                return
            self._pending.add(template_dir)
            self._queue.put(template_dir)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="spares", daemon=True)
                self._worker.start()

    def busy(self) -> bool:
        """Whether copies are wanted or being made now."""
        with self._lock:
            return bool(self._pending)

    def disk_bytes(self, template_dirs: list[Path]) -> int:
        """Disk the spares of these templates take now."""
        total = 0
        for d in template_dirs:
            for f in (*d.glob("spare-*.save"), *d.glob("spare-*.part")):
                try:
                    total += f.stat().st_size
                except OSError:
                    continue  # taken by a clone meanwhile
        return total

    def _work(self) -> None:
        try:  # this thread's own priority (nice 19): restores and guests first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            log.debug("spares: nice 19 refused; copying at normal priority")
        while not self._stop.is_set():
            d = self._queue.get()
            if d is None:
                return
            try:
                while not self._stop.is_set() and d.is_dir() and len(spares(d)) < self.keep:
                    make_spare(d)
            except (OSError, TTError) as e:  # the template went meanwhile, or the disk is full
                log.info("spare copy in %s not made: %s", d, e)
            finally:
                with self._lock:
                    self._pending.discard(d)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        worker = self._worker
        if worker is not None:
            worker.join(timeout=30)


def reap_parts(root: Path) -> int:
    """Remove half-made spare copies under root's template directories (a killed hostd's)."""
    n = 0
    for part in root.glob("*/spare-*.part"):
        part.unlink(missing_ok=True)
        n += 1
    return n
