"""Which caches to evict when the host's caches outgrow their limit (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CacheUse", "evictions"]


@dataclass(frozen=True)
class CacheUse:
    scope_id: str
    last_used: float  # seconds since the epoch: its last clone or commit
    bytes: int  # its versions on disk
    in_use: bool  # a VM has a clone of it: never evicted


def evictions(caches: Iterable[CacheUse], total: int, limit: int) -> list[str]:
    """The least recently used whole caches, oldest first, whose removal brings total (every
    cache file's bytes, clones included) to limit or below; none in use. Fewer when the rest is
    in use (the limit is then exceeded until those jobs end)."""
    out: list[str] = []
    for c in sorted(caches, key=lambda c: (c.last_used, c.scope_id)):
        if total <= limit:
            break
        if c.in_use:
            continue
        out.append(c.scope_id)
        total -= c.bytes
    return out
