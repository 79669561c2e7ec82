"""binfmt_misc for foreign-architecture builds, restored to how we found it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ttci.arch import Arch
from ttci.errors import ImageError
from ttci.run import need, run

log = logging.getLogger("hostd.binfmt")
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def _mounted() -> bool:
    return (BINFMT / "status").exists()


def _enabled(name: str) -> bool:
    entry = BINFMT / f"qemu-{name}"
    return entry.exists() and entry.read_text().splitlines()[0].strip() == "enabled"


@contextlib.contextmanager
def foreign_binaries(arch: Arch) -> Iterator[None]:
    """Make arch's binaries runnable (qemu-user) for the duration; undo what we changed."""
    if arch.is_native():
        yield
        return
    name = arch.row.qemu_user
    need(f"qemu-{name}-static") if name else None
    need("update-binfmts")
    mounted_here = False
    enabled_here = False
    try:
        if not _mounted():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
            mounted_here = True
        if not _enabled(name):
            run(["update-binfmts", "--enable", f"qemu-{name}"])
            enabled_here = True
            if not _enabled(name):
                raise ImageError(
                    f"binfmt_misc entry qemu-{name} did not enable",
                    hint="apt-get install qemu-user-static binfmt-support",
                )
        log.info("binfmt: qemu-%s enabled for the build", name)
        yield
    finally:
        if enabled_here:
            run(["update-binfmts", "--disable", f"qemu-{name}"], check=False)
        if mounted_here:
            run(["umount", str(BINFMT)], check=False)
