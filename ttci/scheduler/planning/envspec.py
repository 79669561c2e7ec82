"""Which VMs an ENV request means: each image its prefix matches, dup_each times, named after the
image. Pure. The request itself (fields, parsing, validation) is ttci.wire.envs.EnvRequest."""

from __future__ import annotations

from ttci.model.errors import BadInput
from ttci.model.naming import ImageName, select_by_prefix
from ttci.wire.envs import MAX_VMS, EnvRequest

__all__ = ["vm_names"]


def vm_names(req: EnvRequest, images: list[str]) -> list[tuple[str, str]]:
    """(VM name, image) for every VM of the ENV, or BadInput listing what exists."""
    chosen = select_by_prefix(images, req.os_prefix)
    if not chosen:
        raise BadInput(
            f"no image matches --os-prefix {req.os_prefix!r}",
            hint=f"images: {', '.join(sorted(images)) or 'none (build some first)'}",
        )
    if len(chosen) * req.dup_each > MAX_VMS:
        raise BadInput(
            f"{len(chosen) * req.dup_each} VMs is more than {MAX_VMS}",
            hint="narrow --os-prefix or lower --dup-each",
        )
    out = []
    for image in chosen:
        n = ImageName.parse(image)
        base = n.release + (f"-{n.profile}" if n.profile != "agent" else "") + f"-{n.arch}"
        for i in range(1, req.dup_each + 1):
            out.append((base if req.dup_each == 1 else f"{base}-{i}", image))
    return out
