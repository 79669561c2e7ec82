"""The admission queue's decisions: which waiting ENV request goes next, and why the others wait.

Pure: given the waiting requests, the hosts' free and total capacity, the quotas and what runs
now, `next_to_place` returns the grants (with their placement) and, for every request left
waiting, its position, what it needs and what blocks it. The scheduler persists the queue and
calls this whenever capacity changes; nothing here is remembered between calls.

Order (`queue_order`), for the requests of one priority level, higher priority levels first:
1. **Aged** requests (waited `aging_s` or more), oldest first. Age beats fair share, so a request
   that waits long enough is only ever behind older or higher-priority ones: it cannot starve.
2. The rest by **fair share, "fewest in use first"** (not deficit round robin): repeatedly the
   project whose vCPUs in use, plus the vCPUs of its requests already ordered ahead, are fewest
   gives its oldest request (ties: the older head). Stateless, so a scheduler restart changes
   nothing; a project with 20 waiting and one with 4 alternate instead of queueing back to back.
3. Within a project, FIFO (enqueue time, then id).

Grants walk that order. A request over its user's or project's quota is skipped ("quota"): it
waits and others may go. A request that does not fit what is free now waits ("capacity"); the
first such request of each priority level, and every aged one, **reserves** capacity: the hosts
it would fit on once their VMs end are chosen and that room is held, so requests behind it may
only use what is left over (backfill that never delays it). All or nothing: a request is granted
only if `placement.place` places every VM. Times are epoch seconds (the queue outlives restarts).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ttci.model.resources import Resources
from ttci.scheduler.planning.placement import Ask, HostView, NoPlacement, place

__all__ = [
    "CAPACITY",
    "IMPOSSIBLE",
    "NO_HOST",
    "QUOTA",
    "AdmissionPolicy",
    "Decision",
    "Grant",
    "InUse",
    "QueuedRequest",
    "Quota",
    "Quotas",
    "Usage",
    "Waiting",
    "feasibility",
    "next_to_place",
    "project_key",
    "queue_order",
]

CAPACITY = "capacity"  # fits the cloud, not what is free now (or free room is held for another)
QUOTA = "quota"  # its user's or project's cap on concurrent VMs / vCPUs
NO_HOST = "no_host"  # an image it needs is only on hosts that are drained: it waits for them
IMPOSSIBLE = "impossible"  # can never fit the hosts that are up: the caller refuses it


def project_key(origin: Mapping[str, str], owner: str) -> str:
    """The fair-share and quota key: "gitlab:group/proj", "github:owner/repo", "jenkins:job",
    or "user:<owner>" for the command line, the admin page and origins without a project."""
    kind, project = origin.get("kind", "cli"), origin.get("project", "")
    return f"user:{owner}" if kind in ("cli", "admin") or not project else f"{kind}:{project}"


def _ask(d: Mapping[str, Any]) -> Ask:
    need = Resources.from_dict(dict(d.get("need", {})))
    cache = str(d.get("cache", ""))  # placement prefers the host holding its newest version
    return Ask(str(d["key"]), str(d["image"]), str(d["arch"]), need, cache)


def _sum(rs: Iterable[Resources]) -> Resources:
    out = Resources()
    for r in rs:
        out = out + r
    return out


@dataclass(frozen=True)
class QueuedRequest:
    """One waiting ENV request: who, for which project, how urgent, since when, which VMs."""

    id: str
    owner: str
    project: str  # project_key(origin, owner)
    kind: str  # the origin's kind: cli, gitlab, github, jenkins, admin
    asks: tuple[Ask, ...]
    enqueued_at: float  # epoch seconds
    priority: int = 0  # higher goes first; Quotas.priority() gives the admin's setting

    @property
    def total(self) -> Resources:
        return _sum(a.need for a in self.asks)

    @property
    def vm_count(self) -> int:
        return len(self.asks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QueuedRequest:
        return cls(**{**d, "asks": tuple(_ask(a) for a in d["asks"])})


@dataclass(frozen=True)
class Quota:
    """What an admin set for one user or project: caps on concurrent VMs and vCPUs, and a
    priority. None is unlimited (caps) or not set (priority)."""

    vms: int | None = None
    cpus: float | None = None
    priority: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quota:
        vms, cpus, prio = d.get("vms"), d.get("cpus"), d.get("priority")
        return cls(
            None if vms is None else int(vms),
            None if cpus is None else float(cpus),
            None if prio is None else int(prio),
        )


@dataclass(frozen=True)
class Quotas:
    """Quotas per user (by name) and per project (by project_key); others get the defaults.
    `kinds` gives each origin kind's default priority (e.g. {"cli": 1})."""

    users: dict[str, Quota] = field(default_factory=dict)
    projects: dict[str, Quota] = field(default_factory=dict)
    default_user: Quota = Quota()
    default_project: Quota = Quota()
    kinds: dict[str, int] = field(default_factory=dict)

    def user(self, name: str) -> Quota:
        return self.users.get(name, self.default_user)

    def project(self, key: str) -> Quota:
        return self.projects.get(key, self.default_project)

    def priority(self, owner: str, project: str, kind: str) -> int:
        """The most specific setting wins: the project's, the user's, the origin kind's, 0."""
        for q in (self.project(project), self.user(owner)):
            if q.priority is not None:
                return q.priority
        return self.kinds.get(kind, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quotas:
        def table(key: str) -> dict[str, Quota]:
            return {str(k): Quota.from_dict(v) for k, v in d.get(key, {}).items()}

        return cls(
            table("users"),
            table("projects"),
            Quota.from_dict(d.get("default_user", {})),
            Quota.from_dict(d.get("default_project", {})),
            {str(k): int(v) for k, v in d.get("kinds", {}).items()},
        )


@dataclass(frozen=True)
class Usage:
    vms: int = 0
    cpus: float = 0.0

    def plus(self, vms: int, cpus: float) -> Usage:
        return Usage(self.vms + vms, self.cpus + cpus)


@dataclass(frozen=True)
class InUse:
    """What runs now (ENVs granted and still being created included), per user and project."""

    users: dict[str, Usage] = field(default_factory=dict)
    projects: dict[str, Usage] = field(default_factory=dict)

    @classmethod
    def tally(cls, vms: Iterable[tuple[str, str, float]]) -> InUse:
        """From one (owner, project key, vCPUs) per VM that counts."""
        users: dict[str, Usage] = {}
        projects: dict[str, Usage] = {}
        for owner, project, cpus in vms:
            users[owner] = users.get(owner, Usage()).plus(1, cpus)
            projects[project] = projects.get(project, Usage()).plus(1, cpus)
        return cls(users, projects)


@dataclass(frozen=True)
class AdmissionPolicy:
    aging_s: float = 600.0  # after this long a request goes before younger ones and reserves
    reserve_head: bool = True  # the first request of each priority that does not fit reserves


@dataclass(frozen=True)
class Waiting:
    """A request left waiting: its place in line and what it waits for."""

    id: str
    position: int  # 1 = next in line
    blocked_by: str  # CAPACITY, QUOTA, NO_HOST or IMPOSSIBLE
    detail: str  # a sentence with the numbers
    needs: Resources
    vms: int
    kind: str
    waited_s: float
    reserved: bool = False  # capacity is held for it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Waiting:
        return cls(**{**d, "needs": Resources.from_dict(dict(d["needs"]))})


@dataclass(frozen=True)
class Grant:
    id: str
    placement: dict[str, str]  # VM key -> host id


@dataclass(frozen=True)
class Decision:
    grants: tuple[Grant, ...]  # start them in this order
    waiting: tuple[Waiting, ...]  # by position

    def to_dict(self) -> dict[str, Any]:
        return {
            "grants": [asdict(g) for g in self.grants],
            "waiting": [w.to_dict() for w in self.waiting],
        }


# --- can it ever fit ----------------------------------------------------------------------

_DIMS = (("cpus", "CPU"), ("memory_mib", "MiB memory"), ("disk_gib", "GiB disk"))


def _say(r: Resources, dims: list[tuple[str, str]]) -> str:
    words = [(getattr(r, d), u) for d, u in dims]
    return " and ".join(f"{v:g} {u}{'s' if u == 'CPU' and v != 1 else ''}" for v, u in words)


def _gap(subject: str, need: Resources, frees: list[Resources], where: str) -> str | None:
    """A sentence when need exceeds what the hosts offer together (or, for one VM, the largest)."""
    one_vm = subject.startswith("VM ")
    biggest = Resources(*(max(getattr(r, d) for r in frees) for d, _ in _DIMS))
    have = biggest if one_vm else _sum(frees)
    dims = [(d, u) for d, u in _DIMS if getattr(need, d) > getattr(have, d)]
    if not dims:
        return None
    if one_vm:
        tail = f"and the largest host {where} offers {_say(have, dims)}"
    elif len(frees) == 1:
        tail = f"in all and the only host {where} offers {_say(have, dims)}"
    else:
        tail = (
            f"in all and the {len(frees)} hosts {where} offer {_say(have, dims)} in all, "
            f"the largest {_say(biggest, dims)}"
        )
    return f"{subject} needs {_say(need, dims)} {tail}"


def feasibility(request: QueuedRequest, hosts: Sequence[HostView]) -> str | None:
    """None when the whole request fits the hosts once they are empty; else why not, stated for
    the whole request. Pass each host's TOTAL capacity as `free` (`replace(view, free=total)`).
    Hosts that are down are ignored; drained hosts count, since they come back."""
    live = [replace(h, draining=False) for h in hosts if h.up]
    images = sorted({a.image for a in request.asks})
    missing = [i for i in images if not any(i in h.images for h in live)]
    if missing:
        return f"no host that is up has image {', '.join(missing)}"
    serving = [h for h in live if h.images & set(images)]

    def frees(image: str) -> list[Resources]:
        return [h.free for h in live if image in h.images]

    n = request.vm_count
    why = _gap(f"the ENV ({n} VMs)", request.total, [h.free for h in serving], "with its images")
    for a in sorted(request.asks, key=lambda a: (-a.need.cpus, -a.need.memory_mib, a.key)):
        why = why or _gap(f"VM {a.key}", a.need, frees(a.image), f"with image {a.image}")
    for image in images:
        same = [a.need for a in request.asks if a.image == image]
        why = why or _gap(f"image {image} ({len(same)} VMs)", _sum(same), frees(image), "with it")
    if why:
        return why
    try:
        place(list(request.asks), serving)
    except NoPlacement as e:
        return f"the ENV's {n} VMs do not fit together even on empty hosts: {e.message}"
    return None


# --- order --------------------------------------------------------------------------------


def _fifo(r: QueuedRequest) -> tuple[float, str]:
    return (r.enqueued_at, r.id)


def _fair(reqs: list[QueuedRequest], load: dict[str, float]) -> list[QueuedRequest]:
    """Fewest vCPUs in use (plus ordered ahead) first; `load` is updated as requests are taken."""
    by_project: dict[str, list[QueuedRequest]] = {}
    for r in sorted(reqs, key=_fifo, reverse=True):
        by_project.setdefault(r.project, []).append(r)  # oldest last: pop() takes it
    heap = [(load.get(p, 0.0), *_fifo(q[-1]), p) for p, q in by_project.items()]
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, _, p = heapq.heappop(heap)
        r = by_project[p].pop()
        out.append(r)
        load[p] = load.get(p, 0.0) + r.total.cpus
        if by_project[p]:
            heapq.heappush(heap, (load[p], *_fifo(by_project[p][-1]), p))
    return out


def queue_order(
    queue: Iterable[QueuedRequest],
    in_use: InUse,
    now: float,
    policy: AdmissionPolicy = AdmissionPolicy(),
) -> list[QueuedRequest]:
    """Every request in line order: priority, then aged oldest first, then fair share, FIFO."""
    levels: dict[int, list[QueuedRequest]] = {}
    for r in queue:
        levels.setdefault(r.priority, []).append(r)
    load = {p: u.cpus for p, u in in_use.projects.items()}
    out: list[QueuedRequest] = []
    for prio in sorted(levels, reverse=True):
        aged = sorted((r for r in levels[prio] if now - r.enqueued_at >= policy.aging_s), key=_fifo)
        for r in aged:
            load[r.project] = load.get(r.project, 0.0) + r.total.cpus
        ids = {r.id for r in aged}
        out += aged + _fair([r for r in levels[prio] if r.id not in ids], load)
    return out


# --- grants -------------------------------------------------------------------------------


@dataclass
class _Budget:
    """Quotas and what each user and project uses, charged as requests are granted."""

    quotas: Quotas
    users: dict[str, Usage]
    projects: dict[str, Usage]

    def over(self, req: QueuedRequest) -> str | None:
        u, p = req.owner, req.project
        for who, quota, used in (
            (f"user {u}", self.quotas.user(u), self.users.get(u, Usage())),
            (f"project {p}", self.quotas.project(p), self.projects.get(p, Usage())),
        ):
            for unit, cap, have, extra in (
                ("VMs", quota.vms, float(used.vms), float(req.vm_count)),
                ("vCPUs", quota.cpus, used.cpus, req.total.cpus),
            ):
                if cap is not None and round(have + extra, 6) > cap:  # float sums
                    alone = " (more than the cap by itself)" if extra > cap else ""
                    return (
                        f"{who} uses {have:g} of {cap:g} {unit} allowed at once and this ENV "
                        f"needs {extra:g}{alone}"
                    )
        return None

    def charge(self, req: QueuedRequest) -> None:
        for table, key in ((self.users, req.owner), (self.projects, req.project)):
            table[key] = table.get(key, Usage()).plus(req.vm_count, req.total.cpus)


def _clamped(r: Resources) -> Resources:
    return Resources(max(r.cpus, 0), max(r.memory_mib, 0), max(r.disk_gib, 0))


@dataclass
class _Room:
    """Free capacity per ready host during one decision, and what is held for reservations."""

    hosts: list[HostView]
    totals: Mapping[str, Resources]
    free: dict[str, Resources]
    held: dict[str, Resources]

    def views(self, req: QueuedRequest) -> list[HostView]:
        """The hosts with any of req's images, free = what is neither used nor held."""
        images = {a.image for a in req.asks}
        return [
            replace(h, free=self.free[h.id] - self.held[h.id])
            for h in self.hosts
            if h.images & images
        ]

    def try_place(self, req: QueuedRequest) -> dict[str, str] | None:
        views = self.views(req)
        if not req.total.fits_in(_sum(_clamped(v.free) for v in views)):
            return None  # the quick answer for most requests in a long queue
        try:
            out = place(list(req.asks), views)
        except NoPlacement:
            return None
        for a in req.asks:
            self.free[out[a.key]] = self.free[out[a.key]] - a.need
        return out

    def reserve(self, req: QueuedRequest) -> bool:
        """Hold room for req on hosts it fits once their VMs end, preferring what is free now."""
        room = {h.id: self.totals.get(h.id, h.free) - self.held[h.id] for h in self.hosts}
        hold: dict[str, Resources] = {}

        def preference(h: HostView, a: Ask) -> tuple[bool, int, float, str]:
            now = self.free[h.id] - self.held[h.id] - hold.get(h.id, Resources())
            return (a.arch in h.kvm_arches, now.memory_mib, now.cpus, h.id)

        for a in sorted(req.asks, key=lambda a: (-a.need.memory_mib, -a.need.cpus, a.key)):
            fits = [h for h in self.hosts if a.image in h.images and a.need.fits_in(room[h.id])]
            if not fits:
                return False
            best = max(fits, key=lambda h: preference(h, a)).id
            room[best] = room[best] - a.need
            hold[best] = hold.get(best, Resources()) + a.need
        for hid, r in hold.items():
            self.held[hid] = self.held[hid] + r
        return True

    def shortage(self, req: QueuedRequest) -> str:
        views = self.views(req)
        free = _sum(_clamped(v.free) for v in views)
        held = any(self.held[v.id] != Resources() for v in views)
        note = " (part of it is held for a request ahead that waits longer)" if held else ""
        return f"needs {req.total.text()} in all; free now: {free.text()}{note}"


def _no_host(req: QueuedRequest, ready: list[HostView]) -> str | None:
    missing = sorted({a.image for a in req.asks} - {i for h in ready for i in h.images})
    if not missing:
        return None
    return f"image {', '.join(missing)} is only on drained hosts; it waits for one to return"


def next_to_place(
    queue: Iterable[QueuedRequest],
    hosts: Sequence[HostView],
    totals: Mapping[str, Resources],
    quotas: Quotas,
    in_use: InUse,
    *,
    now: float,
    policy: AdmissionPolicy = AdmissionPolicy(),
) -> Decision:
    """Which waiting requests to start now (in order, with their placement) and why the rest wait.

    `hosts` are the views placement uses (free = what is free now), `totals` each host's full
    capacity by id, `in_use` what runs now (ENVs being created included). A request that can
    never fit the hosts that are up comes back as IMPOSSIBLE: refuse it with its detail."""
    ready = [h for h in hosts if h.up and not h.draining]
    whole = [replace(h, free=totals.get(h.id, h.free)) for h in hosts if h.up]
    room = _Room(ready, totals, {h.id: h.free for h in ready}, {h.id: Resources() for h in ready})
    budget = _Budget(quotas, dict(in_use.users), dict(in_use.projects))
    grants: list[Grant] = []
    waiting: list[Waiting] = []
    reserved_levels: set[int] = set()
    for req in queue_order(queue, in_use, now, policy):
        held = False
        if why := feasibility(req, whole):
            blocked = (IMPOSSIBLE, why)
        elif why := _no_host(req, ready):
            blocked = (NO_HOST, why)
        elif why := budget.over(req):
            blocked = (QUOTA, why)
        elif (placement := room.try_place(req)) is not None:
            grants.append(Grant(req.id, placement))
            budget.charge(req)
            continue
        else:
            blocked = (CAPACITY, room.shortage(req))
            aged = now - req.enqueued_at >= policy.aging_s
            if aged or (policy.reserve_head and req.priority not in reserved_levels):
                reserved_levels.add(req.priority)
                held = room.reserve(req)
        waited = max(0.0, now - req.enqueued_at)
        needs, n = req.total, req.vm_count
        waiting.append(
            Waiting(req.id, len(waiting) + 1, *blocked, needs, n, req.kind, waited, held)
        )
    return Decision(tuple(grants), tuple(waiting))
