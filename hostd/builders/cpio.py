"""A gzip'd newc cpio archive (the initrd format), written without the cpio tool."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

__all__ = ["Entry", "directory", "file", "gz_newc", "newc"]

_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    path: str  # without leading slash, e.g. "bin/busybox"
    mode: int  # full st_mode, e.g. stat.S_IFREG | 0o755
    data: bytes = b""  # file content, or the link target for symlinks
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, *e.rdev, namesize, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def newc(entries: list[Entry]) -> bytes:
    """The uncompressed archive; parents must come before children."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.path.encode() + b"\0"
        out += _header(ino if e.path != "TRAILER!!!" else 0, e, len(name))
        out += name + _pad(110 + len(name))
        out += e.data + _pad(len(e.data))
    return bytes(out)


def gz_newc(entries: list[Entry]) -> bytes:
    return gzip.compress(newc(entries), compresslevel=6, mtime=0)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | mode, data)
