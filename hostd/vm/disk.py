"""VM and template disks on the host's storage backend (hostd/storage: qcow2 overlays by default,
ZFS clones with --storage zfs:...): an image's disk is a frozen volume, imported once; a VM's or
template's disk is a copy-on-write clone of it (or of a template's frozen disk), so the image is
never written."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hostd.images.catalogue import Image
from hostd.storage.qcow2 import create_overlay
from hostd.storage.volumes import (
    DISK_FILE,
    Volumes,
    image_volume,
    make_backend,
    template_volume,
    vm_volume,
)
from ttci.infra.db import Store

__all__ = [
    "create_overlay",
    "dir_bytes",
    "image_digest",
    "image_source",
    "open_volumes",
    "prune_image_volumes",
    "reconcile_volumes",
    "vm_disk",
]


def image_digest(image: Image) -> str:
    """An image build's identity: its manifest inputs and its files' digests."""
    m = image.manifest
    parts = [m.name, m.inputs_key, m.built_at, m.kernel_cmdline]
    parts += [f.sha256 for f in (m.kernel, m.initrd, m.disk)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def image_source(volumes: Volumes, image: Image) -> str:
    """The frozen volume of image's disk (imported the first time it is asked for)."""
    source = image.file(image.manifest.disk.path)
    return volumes.image(image_volume(image_digest(image)), source)


def vm_disk(
    volumes: Volumes, vm_id: str, dest: Path, size_gib: int, *, image: Image, template: str = ""
) -> Path:
    """A VM's disk at dest: a clone of template's frozen disk, else of its image's."""
    source = template_volume(template) if template else image_source(volumes, image)
    owner = f"vm:{vm_id}"
    return volumes.clone(
        source, vm_volume(vm_id), kind="vm", owner=owner, dest=dest, size_gib=size_gib
    )


def dir_bytes(directory: Path, volumes: Volumes, template_id: str) -> int:
    """What a template takes: its files, and its disk where that is a volume elsewhere (ZFS)."""
    files = sum(
        f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink()
    )
    linked = (directory / DISK_FILE).is_symlink()
    return files + (volumes.size(template_volume(template_id)) if linked else 0)


def open_volumes(store: Store, storage: str, state_dir: Path) -> Volumes:
    """hostd's volumes on the backend --storage names, checked and claimed for the hostd of
    state_dir (BadInput says how to fix what is wrong)."""
    backend = make_backend(storage)
    backend.check()
    backend.claim(str(state_dir.resolve()))
    return Volumes(store, backend)


def reconcile_volumes(
    volumes: Volumes,
    vms: list[dict[str, Any]],
    templates: list[dict[str, Any]],
    images: list[Image],
) -> dict[str, int]:
    """After a start: the volumes of VMs, templates and images that are gone go too."""
    live_vms = {r["id"] for r in vms if r["state"] in ("creating", "running")}
    live_templates = {r["id"] for r in templates}
    live_images = {image_volume(image_digest(i)) for i in images}
    return volumes.reconcile(
        {
            "vm": live_vms.__contains__,
            "template": live_templates.__contains__,
            "image": live_images.__contains__,
        }
    )


def prune_image_volumes(volumes: Volumes, images: list[Image]) -> list[str]:
    """`tt image prune`: image volumes no clone uses go (ZFS: the image's dataset; imported
    again when next needed); those of images gone or rebuilt go with their last clone."""
    return volumes.prune_images({image_volume(image_digest(i)) for i in images})
