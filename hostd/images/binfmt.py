"""binfmt_misc for foreign-architecture builds, restored to how we found it.

What we change is written to a journal in the build cache *before* we change it, so a build that
was SIGKILLed is undone by the next build (`restore_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ttci.arch import Arch
from ttci.errors import ImageError
from ttci.run import need, run

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


@contextlib.contextmanager
def foreign_binaries(arch: Arch, cache_dir: Path) -> Iterator[None]:
    """Make arch's binaries runnable (qemu-user) for the duration; undo what we changed."""
    if arch.is_native():
        yield
        return
    name = arch.row.qemu_user
    need(f"qemu-{name}-static")
    need("update-binfmts")
    journal = cache_dir / JOURNAL
    mount_it = not _mounted()
    enable = [] if not mount_it and _enabled(name) else [name]
    journal.write_text(json.dumps({"mounted": mount_it, "enabled": enable}))
    try:
        if mount_it:
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        if enable:
            run(["update-binfmts", "--enable", f"qemu-{name}"])
            if not _enabled(name):
                raise ImageError(
                    f"binfmt_misc entry qemu-{name} did not enable",
                    hint="apt-get install qemu-user-static binfmt-support",
                )
        log.info("binfmt: qemu-%s enabled for the build", name)
        yield
    finally:
        _undo(mount_it, enable)
        journal.unlink(missing_ok=True)
