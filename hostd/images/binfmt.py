"""binfmt_misc for foreign-architecture builds, restored to how we found it.

Several builds may run at once: the manager counts users per entry and undoes a change when the
last user is done. What we change is written to a journal in the build cache *before* we change
it, so a build that was SIGKILLed is undone by the next build (`restore_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from ttci.infra.proc import need, run
from ttci.model.arch import Arch
from ttci.model.errors import ImageError

__all__ = ["BINFMT", "JOURNAL", "Binfmt", "restore_leftovers"]

log = logging.getLogger("hostd.binfmt")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
JOURNAL = ".binfmt-journal.json"


def _mounted() -> bool:
    return (BINFMT / "status").exists()


def _enabled(name: str) -> bool:
    entry = BINFMT / f"qemu-{name}"
    return entry.exists() and entry.read_text().splitlines()[0].strip() == "enabled"


def _undo(mounted_here: bool, enabled: list[str]) -> None:
    for name in enabled:
        run(["update-binfmts", "--disable", f"qemu-{name}"], check=False)
    if mounted_here and _mounted():
        run(["umount", str(BINFMT)], check=False)


def restore_leftovers(cache_dir: Path) -> None:
    """Undo binfmt changes of a build that died without cleaning up."""
    journal = cache_dir / JOURNAL
    if not journal.exists():
        return
    try:
        data = json.loads(journal.read_text())
        log.info("restoring binfmt_misc after an interrupted build: %s", data)
        _undo(bool(data.get("mounted")), list(data.get("enabled", [])))
    except ValueError:
        pass
    journal.unlink(missing_ok=True)


class Binfmt:
    """Process-wide owner of our binfmt_misc changes for one build cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.journal = cache_dir / JOURNAL
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}
        self._mounted_here = False
        self._enabled_here: list[str] = []

    def _write_journal(self) -> None:
        if self._mounted_here or self._enabled_here:
            self.journal.write_text(
                json.dumps({"mounted": self._mounted_here, "enabled": self._enabled_here})
            )
        else:
            self.journal.unlink(missing_ok=True)

    def _acquire(self, name: str) -> None:
        with self._lock:
            self._users[name] = self._users.get(name, 0) + 1
            if self._users[name] > 1:
                return
            if not _mounted():
                self._mounted_here = True
                self._write_journal()
                run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
            if not _enabled(name):
                self._enabled_here.append(name)
                self._write_journal()
                run(["update-binfmts", "--enable", f"qemu-{name}"])
                if not _enabled(name):
                    raise ImageError(
                        f"binfmt_misc entry qemu-{name} did not enable",
                        hint="apt-get install qemu-user-static binfmt-support",
                    )
            log.info("binfmt: qemu-%s enabled for the build", name)

    def _release(self, name: str) -> None:
        with self._lock:
            self._users[name] -= 1
            if self._users[name] > 0:
                return
            if name in self._enabled_here:
                _undo(False, [name])
                self._enabled_here.remove(name)
            if self._mounted_here and not any(self._users.values()):
                _undo(True, [])
                self._mounted_here = False
            self._write_journal()

    @contextlib.contextmanager
    def foreign(self, arch: Arch) -> Iterator[None]:
        """Make arch's binaries runnable (qemu-user) for the duration; undo what we changed."""
        if arch.is_native():
            yield
            return
        name = arch.row.qemu_user
        need(f"qemu-{name}-static")
        need("update-binfmts")
        try:
            self._acquire(name)
            yield
        finally:
            self._release(name)
