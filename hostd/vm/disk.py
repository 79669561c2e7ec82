"""A VM's disk: a copy-on-write overlay on its image's disk, so the image is never written.

The mechanics live in hostd/storage (the qcow2 backend; ZFS clones with --storage zfs:...)."""

from __future__ import annotations

from hostd.storage.qcow2 import create_overlay

__all__ = ["create_overlay"]
