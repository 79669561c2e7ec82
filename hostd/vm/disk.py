"""A VM's disk: a copy-on-write overlay on its image's disk, so the image is never written."""

from __future__ import annotations

from pathlib import Path

from hostd.builders.qemu_argv import overlay_argv
from ttci.infra.proc import run

__all__ = ["create_overlay"]


def create_overlay(base: Path, path: Path, size_gib: int | None = None) -> None:
    """Make path a qcow2 overlay of base (size_gib: its virtual size, else base's)."""
    run(overlay_argv(base, path, size_gib))
