"""Placement: which host runs which VM. A pure function of hosts and asks."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ttci.model.errors import TTError
from ttci.model.resources import Resources

__all__ = ["Ask", "HostView", "NoPlacement", "place"]


class NoPlacement(TTError):
    """The asks do not fit the pool; the message says how much is free."""


@dataclass(frozen=True)
class HostView:
    id: str
    free: Resources
    images: frozenset[str]
    kvm_arches: frozenset[str] = frozenset()  # arches this host runs natively with KVM
    up: bool = True
    draining: bool = False
    caches: frozenset[str] = frozenset()  # cache scope ids whose newest version is here


@dataclass(frozen=True)
class Ask:
    key: str  # the VM's name in its ENV
    image: str
    arch: str
    need: Resources = field(default_factory=Resources)
    cache: str = ""  # the scope id of the ENV's cache ("": none)


def place(asks: list[Ask], hosts: list[HostView]) -> dict[str, str]:
    """Map every ask's key to a host id, or raise NoPlacement naming what is short.

    Prefers a host running the arch natively with KVM, then one holding the newest version of
    the VM's cache (never waiting for it: a full one is passed over), then the host with the
    most free memory (then CPUs) left, so an ENV's VMs spread over the pool. One heap of
    candidate hosts per image (and cache), refreshed lazily as hosts fill up: O(VMs x log
    hosts) for the usual ENV.
    """
    free = {h.id: h.free for h in hosts if h.up and not h.draining}
    by_id = {h.id: h for h in hosts}
    rank = {hid: i for i, hid in enumerate(sorted(by_id))}
    heaps: dict[tuple[str, str, str], list[tuple[bool, bool, int, float, int, str]]] = {}

    def entry(hid: str, ask: Ask) -> tuple[bool, bool, int, float, int, str]:
        f, h = free[hid], by_id[hid]
        cold_cache = bool(ask.cache) and ask.cache not in h.caches
        return (ask.arch not in h.kvm_arches, cold_cache, -f.memory_mib, -f.cpus, -rank[hid], hid)

    out: dict[str, str] = {}
    order = sorted(asks, key=lambda a: (-a.need.memory_mib, -a.need.cpus, a.key))
    for ask in order:
        heap = heaps.get((ask.image, ask.arch, ask.cache))
        if heap is None:
            heap = [entry(hid, ask) for hid in free if ask.image in by_id[hid].images]
            heapq.heapify(heap)
            heaps[(ask.image, ask.arch, ask.cache)] = heap
        if not heap:
            have = sorted({i for h in hosts if h.up for i in h.images})
            raise NoPlacement(
                f"no host that is up has image {ask.image}",
                hint=f"images in the pool: {', '.join(have) or 'none'}",
            )
        too_small = []
        best = None
        while heap:
            top = heapq.heappop(heap)
            current = entry(top[-1], ask)
            if top != current:  # the host filled up since: requeue with its current room
                heapq.heappush(heap, current)
                continue
            if ask.need.fits_in(free[top[-1]]):
                best = top[-1]
                break
            too_small.append(top)
        if best is None:
            raise _no_room(ask, asks, hosts, free)
        free[best] = free[best] - ask.need
        heapq.heappush(heap, entry(best, ask))
        for t in too_small:
            heapq.heappush(heap, t)
        out[ask.key] = best
    return out


def _no_room(
    ask: Ask, asks: list[Ask], hosts: list[HostView], free: dict[str, Resources]
) -> NoPlacement:
    same = [a for a in asks if a.image == ask.image]
    need = Resources()
    for a in same:
        need = need + a.need
    pool = Resources()
    for h in hosts:
        if h.id in free and ask.image in h.images:
            pool = pool + h.free
    return NoPlacement(
        f"the {len(same)} VM(s) of image {ask.image} need {need.text()} in all; "
        f"free on the hosts that have it: {pool.text()}",
        hint="ask for fewer or smaller VMs, delete ENVs, or add hosts",
    )
