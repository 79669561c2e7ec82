"""Checks of a VM request against this host's image, before anything is recorded or made."""

from __future__ import annotations

import re

from hostd.images.catalogue import Image
from ttci.model.errors import BadInput
from ttci.model.resources import validate_vm_size
from ttci.wire.envs import VMRequest

__all__ = ["check_vm_name", "disk_for"]

_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")


def check_vm_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise BadInput(
            f"VM name {name!r} is not valid", hint="use 1-63 lowercase letters, digits and dashes"
        )


def disk_for(req: VMRequest, image: Image) -> int:
    """The VM's disk in GiB (the image's own size unless it asks for more), or BadInput."""
    disk_gib = req.disk_gib or max(1, image.manifest.disk_virtual_size >> 30)
    if disk_gib << 30 < image.manifest.disk_virtual_size:
        raise BadInput(
            f"--disk {disk_gib} GiB is smaller than image {image.name} "
            f"({image.manifest.disk_virtual_size >> 30} GiB)",
            hint="ask for more disk",
        )
    problems = validate_vm_size(req.cpus, req.memory_mib, disk_gib)
    if problems:
        raise BadInput("; ".join(problems), hint="pick sizes inside the ranges")
    return disk_gib
