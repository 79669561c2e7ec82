"""Placement: which host runs which VM. A pure function of hosts and asks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ttci.errors import TTError
from ttci.resources import Resources


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


@dataclass(frozen=True)
class Ask:
    key: str  # the VM's name in its ENV
    image: str
    arch: str
    need: Resources = field(default_factory=Resources)


def place(asks: list[Ask], hosts: list[HostView]) -> dict[str, str]:
    """Map every ask's key to a host id, or raise NoPlacement naming what is short.

    Prefers a host running the arch natively with KVM, then the host with the most free memory
    left after placing (so an ENV's VMs spread over the pool).
    """
    free = {h.id: h.free for h in hosts if h.up and not h.draining}
    by_id = {h.id: h for h in hosts}
    out: dict[str, str] = {}
    order = sorted(asks, key=lambda a: (-a.need.memory_mib, -a.need.cpus, a.key))
    for ask in order:
        candidates = [hid for hid in free if ask.image in by_id[hid].images]
        if not candidates:
            have = sorted({i for h in hosts if h.up for i in h.images})
            raise NoPlacement(
                f"no host that is up has image {ask.image}",
                hint=f"images in the pool: {', '.join(have) or 'none'}",
            )
        fitting = [hid for hid in candidates if ask.need.fits_in(free[hid])]
        if not fitting:
            same = [a for a in asks if a.image == ask.image]
            need = Resources()
            for a in same:
                need = need + a.need
            pool = Resources()
            for h in hosts:
                if h.id in free and ask.image in h.images:
                    pool = pool + h.free
            raise NoPlacement(
                f"the {len(same)} VM(s) of image {ask.image} need {need.text()} in all; "
                f"free on the hosts that have it: {pool.text()}",
                hint="ask for fewer or smaller VMs, delete ENVs, or add hosts",
            )
        best = max(
            fitting,
            key=lambda hid: (
                ask.arch in by_id[hid].kvm_arches,
                (free[hid] - ask.need).memory_mib,
                (free[hid] - ask.need).cpus,
                hid,
            ),
        )
        free[best] = free[best] - ask.need
        out[ask.key] = best
    return out
