"""The admission queue's decisions (ttci/scheduler/planning/admission.py): pure, fast.

Given a queue and the hosts' capacity, which request goes next, where, and why the others wait.
The small simulations run a cloud tick by tick: each tick jobs end, new ones arrive, and the
scheduler asks `next_to_place` and starts what it grants.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

from ttci.model.resources import Resources
from ttci.scheduler.planning.admission import (
    CAPACITY,
    IMPOSSIBLE,
    NO_HOST,
    QUOTA,
    AdmissionPolicy,
    Decision,
    InUse,
    QueuedRequest,
    Quota,
    Quotas,
    Waiting,
    feasibility,
    next_to_place,
    project_key,
    queue_order,
)
from ttci.scheduler.planning.placement import Ask, HostView

IMG = "qemu:debian-12:amd64"
NO_RESERVE = AdmissionPolicy(aging_s=float("inf"), reserve_head=False)


def req(
    rid: str,
    project: str = "gitlab:g/p",
    *,
    owner: str = "",
    t: float = 0.0,
    vms: int = 1,
    cpus: float = 1,
    prio: int = 0,
    images: tuple[str, ...] = (IMG,),
) -> QueuedRequest:
    asks = tuple(
        Ask(f"vm{i}", images[i % len(images)], "amd64", Resources(cpus, 512, 4)) for i in range(vms)
    )
    return QueuedRequest(rid, owner or project, project, "gitlab", asks, t, prio)


def host(
    hid: str,
    cpus: float = 4,
    images: tuple[str, ...] = (IMG,),
    up: bool = True,
    draining: bool = False,
) -> HostView:
    free = Resources(cpus, 65536, 1000)
    return HostView(hid, free, frozenset(images), up=up, draining=draining)


@dataclass
class Cloud:
    """Hosts with a total capacity and the requests running on them."""

    hosts: list[HostView]
    running: dict[str, tuple[QueuedRequest, dict[str, str]]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    def views(self) -> list[HostView]:
        out = []
        for h in self.hosts:
            free = h.free
            for r, placement in self.running.values():
                for a in r.asks:
                    if placement[a.key] == h.id:
                        free = free - a.need
            out.append(HostView(h.id, free, h.images, h.kvm_arches, h.up, h.draining))
        return out

    def in_use(self) -> InUse:
        return InUse.tally(
            (r.owner, r.project, a.need.cpus) for r, _ in self.running.values() for a in r.asks
        )

    def decide(
        self,
        queue: list[QueuedRequest],
        now: float = 0.0,
        quotas: Quotas | None = None,
        policy: AdmissionPolicy | None = None,
    ) -> Decision:
        totals = {h.id: h.free for h in self.hosts}
        d = next_to_place(
            queue,
            self.views(),
            totals,
            quotas or Quotas(),
            self.in_use(),
            now=now,
            policy=policy or AdmissionPolicy(),
        )
        by_id = {r.id: r for r in queue}
        for g in d.grants:
            self.running[g.id] = (by_id[g.id], g.placement)
            self.started.append(g.id)
            queue.remove(by_id[g.id])
        return d


# --- order ------------------------------------------------------------------------------


def test_priority_first_then_fifo() -> None:
    queue = [req("old", t=1), req("urgent", t=5, prio=10), req("new", t=3)]
    assert [r.id for r in queue_order(queue, InUse(), now=10)] == ["urgent", "old", "new"]
    cloud = Cloud([host("h1", cpus=1)])
    d = cloud.decide(queue, now=10)
    assert [g.id for g in d.grants] == ["urgent"]
    assert [(w.id, w.position, w.blocked_by) for w in d.waiting] == [
        ("old", 1, CAPACITY),
        ("new", 2, CAPACITY),
    ]


def test_fifo_within_a_project_by_enqueue_time_then_id() -> None:
    queue = [req("c", t=2), req("b", t=1), req("a", t=2), req("d", t=0.5)]
    assert [r.id for r in queue_order(queue, InUse(), now=3)] == ["d", "b", "a", "c"]


def test_fair_share_interleaves_a_project_of_20_with_one_of_4() -> None:
    big = [req(f"big{i}", "github:org/big", t=i * 0.01) for i in range(20)]
    small = [req(f"small{i}", "github:org/small", t=1 + i * 0.01) for i in range(4)]
    order = [r.id for r in queue_order(big + small, InUse(), now=2)]
    assert [order.index(f"small{i}") for i in range(4)] == [1, 3, 5, 7]
    # Run it on a 4-CPU cloud, each grant started, the oldest job ending each tick.
    cloud, queue = Cloud([host("h1")]), big + small
    for tick in range(40):
        cloud.decide(queue, now=2 + tick)
        if cloud.running:
            del cloud.running[next(iter(cloud.running))]
    assert not queue
    last_small = max(cloud.started.index(f"small{i}") for i in range(4))
    assert last_small <= 8, cloud.started  # not behind all 20 of the big project's


def test_fair_share_counts_what_a_project_already_runs() -> None:
    queue = [req("busy-1", "p:busy", t=0), req("idle-1", "p:idle", t=5)]
    in_use = InUse.tally([("u", "p:busy", 8.0)])
    assert [r.id for r in queue_order(queue, in_use, now=6)] == ["idle-1", "busy-1"]


def test_aged_requests_go_first_oldest_first() -> None:
    policy = AdmissionPolicy(aging_s=60)
    in_use = InUse.tally([("u", "p:busy", 8.0)])
    queue = [req("fresh", "p:idle", t=90), req("aged", "p:busy", t=10)]
    assert [r.id for r in queue_order(queue, in_use, now=100, policy=policy)] == [
        "aged",
        "fresh",
    ]
    assert [r.id for r in queue_order(queue, in_use, now=65, policy=policy)] == [
        "fresh",
        "aged",
    ]


# --- quotas ---------------------------------------------------------------------------------


def test_over_quota_is_skipped_and_others_go() -> None:
    quotas = Quotas(users={"alice": Quota(vms=2)})
    cloud = Cloud([host("h1", cpus=8)])
    two = req("r0", "user:alice", owner="alice", vms=2)
    cloud.running["r0"] = (two, {"vm0": "h1", "vm1": "h1"})
    queue = [req("a1", "user:alice", owner="alice", t=1), req("b1", "user:bob", owner="bob", t=2)]
    d = cloud.decide(queue, now=3, quotas=quotas)
    assert [g.id for g in d.grants] == ["b1"]
    (w,) = d.waiting
    assert (w.id, w.position, w.blocked_by) == ("a1", 1, QUOTA)
    assert w.detail == "user alice uses 2 of 2 VMs allowed at once and this ENV needs 1"


def test_quota_counts_grants_made_in_the_same_decision() -> None:
    quotas = Quotas(projects={"github:o/r": Quota(cpus=3)})
    queue = [req(f"j{i}", "github:o/r", t=i, cpus=1.5) for i in range(3)]
    d = Cloud([host("h1", cpus=16)]).decide(queue, now=5, quotas=quotas)
    assert [g.id for g in d.grants] == ["j0", "j1"]
    assert [(w.id, w.blocked_by) for w in d.waiting] == [("j2", QUOTA)]
    assert "project github:o/r uses 3 of 3 vCPUs" in d.waiting[0].detail


def test_fractional_vcpus_sum_up_to_the_cap_exactly() -> None:
    quotas = Quotas(default_project=Quota(cpus=0.3))
    queue = [req(f"j{i}", cpus=0.1, t=i) for i in range(4)]
    d = Cloud([host("h1")]).decide(queue, now=5, quotas=quotas)
    assert [g.id for g in d.grants] == ["j0", "j1", "j2"]


def test_a_request_bigger_than_its_quota_says_so() -> None:
    quotas = Quotas(default_user=Quota(vms=4))
    d = Cloud([host("h1", cpus=16)]).decide([req("x", vms=7)], quotas=quotas)
    assert d.waiting[0].blocked_by == QUOTA
    assert d.waiting[0].detail.endswith("needs 7 (more than the cap by itself)")


def test_quotas_give_priorities_most_specific_first() -> None:
    q = Quotas(
        users={"alice": Quota(priority=5)},
        projects={"gitlab:g/p": Quota(vms=3, priority=-1)},
        kinds={"cli": 2},
    )
    assert q.priority("alice", "gitlab:g/p", "gitlab") == -1
    assert q.priority("alice", "gitlab:g/other", "gitlab") == 5
    assert q.priority("bob", "user:bob", "cli") == 2
    assert q.priority("bob", "user:bob", "jenkins") == 0


# --- capacity, all or nothing, reservations ------------------------------------------------


def test_all_or_nothing_no_partial_grant() -> None:
    cloud = Cloud([host("h1")])
    cloud.running["r"] = (req("r", "p:r", cpus=2), {"vm0": "h1"})
    queue = [req("three", "p:a", vms=3, t=0), req("one", "p:b", t=1)]
    d = cloud.decide(queue, policy=NO_RESERVE)
    assert [g.id for g in d.grants] == ["one"]
    assert d.waiting[0].detail == (
        "needs 3 CPU, 1536 MiB memory, 12 GiB disk in all; "
        "free now: 2 CPU, 65024 MiB memory, 996 GiB disk"
    )
    assert cloud.running["one"][1] == {"vm0": "h1"}


def test_the_head_reserves_and_others_only_backfill_what_it_does_not_need() -> None:
    # h1: 1 CPU free, h2: 2 free. The head (one 4-CPU VM) is held on h2, where it fits soonest.
    cloud = Cloud([host("h1"), host("h2")])
    cloud.running["x"] = (req("x", "p:x", cpus=3), {"vm0": "h1"})
    cloud.running["y"] = (req("y", "p:y", cpus=2), {"vm0": "h2"})
    queue = [req("big", "p:big", cpus=4, t=0), req("s1", "p:s", t=1), req("s2", "p:s", t=2)]
    d = cloud.decide(queue, now=3)
    assert [(g.id, g.placement) for g in d.grants] == [("s1", {"vm0": "h1"})]
    assert [(w.id, w.blocked_by, w.reserved) for w in d.waiting] == [
        ("big", CAPACITY, True),
        ("s2", CAPACITY, False),
    ]
    assert "held for a request ahead" in d.waiting[1].detail
    del cloud.running["y"]  # h2 empties: the big one gets it, not s2
    d = cloud.decide(queue, now=4)
    assert [(g.id, g.placement) for g in d.grants] == [("big", {"vm0": "h2"})]


def _stream(policy: AdmissionPolicy, ticks: int) -> list[str]:
    """A 4-CPU cloud; project `stream` sends two 1-CPU jobs a tick, each runs 3 ticks; project
    `big` asks for an ENV of 4 VMs at tick 1. The ids in the order they started."""
    cloud = Cloud([host("h1")])
    queue: list[QueuedRequest] = []
    ends: dict[str, int] = {}
    for tick in range(ticks):
        for rid in [r for r, end in ends.items() if end == tick]:
            del cloud.running[rid]
        queue += [req(f"s{tick}-{i}", "github:o/stream", t=tick + i / 10) for i in range(2)]
        if tick == 1:
            queue.append(req("big", "github:o/big", vms=4, t=1.5))
        for g in cloud.decide(queue, now=tick, policy=policy).grants:
            ends[g.id] = tick + 3
    return cloud.started


def test_a_big_env_is_not_starved_by_a_stream_of_small_ones() -> None:
    started = _stream(AdmissionPolicy(), ticks=30)
    assert "big" in started
    assert started.index("big") <= 8  # the 4 running when it came, at most 4 more backfilled


def test_without_reservation_the_stream_starves_it() -> None:
    assert "big" not in _stream(NO_RESERVE, ticks=60)  # why the reservation exists


def test_aging_alone_ends_the_starvation() -> None:
    started = _stream(AdmissionPolicy(aging_s=10, reserve_head=False), ticks=40)
    assert "big" in started


# --- impossible requests and drained hosts ---------------------------------------------------


def test_the_whole_env_is_measured_against_the_cloud() -> None:
    images = tuple(f"qemu:debian-12:{a}" for a in ("amd64", "arm64", "armhf", "i386"))
    images += ("qemu:debian-12:ppc64el", "qemu:debian-12:riscv64", "qemu:debian-12:s390x")
    r = req("x", vms=7, images=images)
    assert feasibility(r, [host("h1", images=images)]) == (
        "the ENV (7 VMs) needs 7 CPUs in all and the only host with its images offers 4 CPUs"
    )
    assert feasibility(r, [host("h1", images=images), host("h2", images=images)]) is None


def test_whole_request_reasons() -> None:
    two = [host("h1"), host("h2")]
    assert feasibility(req("x", vms=10), two) == (
        "the ENV (10 VMs) needs 10 CPUs in all and the 2 hosts with its images offer 8 CPUs "
        "in all, the largest 4 CPUs"
    )
    assert feasibility(req("x", cpus=8), two) == (
        f"VM vm0 needs 8 CPUs and the largest host with image {IMG} offers 4 CPUs"
    )
    assert feasibility(req("x", images=("qemu:debian-13:s390x",)), two) == (
        "no host that is up has image qemu:debian-13:s390x"
    )
    other = "qemu:debian-12:arm64"
    split = [host("h1"), host("h2", images=(other,))]
    five_and_one = req("x", vms=6, images=(IMG, IMG, IMG, IMG, IMG, other))
    assert feasibility(five_and_one, split) == (
        f"image {IMG} (5 VMs) needs 5 CPUs in all and the only host with it offers 4 CPUs"
    )
    asks = tuple(Ask(f"v{c}", IMG, "amd64", Resources(c, 512, 4)) for c in (3, 3, 2))
    packed = QueuedRequest("x", "u", "user:u", "cli", asks, 0.0)
    why = feasibility(packed, two)
    assert why is not None
    assert why.startswith("the ENV's 3 VMs do not fit together even on empty hosts: ")


def test_down_hosts_do_not_count_and_drained_ones_do() -> None:
    assert feasibility(req("x"), [host("h1", up=False)]) == f"no host that is up has image {IMG}"
    assert feasibility(req("x"), [host("h1", draining=True)]) is None


def test_next_to_place_reports_impossible_and_no_host_with_positions() -> None:
    other = "qemu:debian-12:arm64"
    cloud = Cloud([host("h1", cpus=2), host("h2", images=(other,), draining=True)])
    queue = [
        req("huge", "p:a", vms=9, t=0),
        req("arm", "p:b", images=(other,), t=1),
        req("ok", "p:c", t=2),
        req("ok2", "p:c", t=3),
        req("wait", "p:c", t=4),
    ]
    d = cloud.decide(queue, now=10)
    assert [g.id for g in d.grants] == ["ok", "ok2"]
    assert [(w.id, w.position, w.blocked_by) for w in d.waiting] == [
        ("huge", 1, IMPOSSIBLE),
        ("arm", 2, NO_HOST),
        ("wait", 3, CAPACITY),
    ]
    assert d.waiting[0].detail.startswith("the ENV (9 VMs) needs 9 CPUs in all")
    assert d.waiting[1].detail == (
        f"image {other} is only on drained hosts; it waits for one to return"
    )
    assert d.waiting[2].waited_s == 6
    assert d.waiting[2].needs == Resources(1, 512, 4)


# --- values -------------------------------------------------------------------------------


def test_project_keys() -> None:
    assert project_key({"kind": "gitlab", "project": "g/p"}, "ci") == "gitlab:g/p"
    assert project_key({"kind": "github", "project": "o/r"}, "gh") == "github:o/r"
    assert project_key({"kind": "cli", "project": "x"}, "alice") == "user:alice"
    assert project_key({"kind": "jenkins"}, "bob") == "user:bob"


def test_values_round_trip_through_json() -> None:
    r = req("x", vms=2, prio=3, t=1.25)
    assert QueuedRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # a queued request read back from the database keeps its VMs' cache (placement prefers it)
    cached = dataclasses.replace(r, asks=tuple(dataclasses.replace(a, cache="c1") for a in r.asks))
    back = QueuedRequest.from_dict(json.loads(json.dumps(cached.to_dict())))
    assert back == cached and {a.cache for a in back.asks} == {"c1"}
    q = Quotas(
        users={"a": Quota(vms=2)},
        projects={"gitlab:g/p": Quota(cpus=1.5, priority=2)},
        default_user=Quota(vms=10),
        kinds={"cli": 1},
    )
    assert Quotas.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert Quotas.from_dict({}) == Quotas()
    w = Waiting("x", 2, CAPACITY, "why", Resources(2, 1024, 8), 2, "cli", 3.5, True)
    assert Waiting.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    d = Cloud([host("h1", cpus=1)]).decide([req("a"), req("b", t=1)])
    out = json.loads(json.dumps(d.to_dict()))
    assert out["grants"] == [{"id": "a", "placement": {"vm0": "h1"}}]
    assert out["waiting"][0]["blocked_by"] == CAPACITY


def test_a_long_queue_decides_quickly() -> None:
    hosts = [host(f"h{i}", cpus=64) for i in range(20)]
    queue = [req(f"r{i}", f"p:{i % 50}", t=i, vms=1 + i % 4) for i in range(2000)]
    start = time.perf_counter()
    d = Cloud(hosts).decide(queue, now=3000)
    assert time.perf_counter() - start < 2.0
    assert sum(len(g.placement) for g in d.grants) == 20 * 64
    assert [w.position for w in d.waiting] == list(range(1, len(d.waiting) + 1))
