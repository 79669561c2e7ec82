"""Cache volumes, pure: the KEY:/path grammar, scoping (no key reaches a path, projects never
share), the wire fields, the LRU choice, the hosts' reports and the scheduler's merged view."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hostd.cache.lru import CacheUse, evictions
from runner_executor.core.job import JobError, Size
from runner_executor.core.job import env_request as gitlab_env_request
from ttci.model.cache import CacheScope, CacheSpec, check_cache_path, parse_cache
from ttci.model.errors import BadInput
from ttci.model.resources import Resources
from ttci.scheduler.cache_metrics import cache_metrics, cache_rows
from ttci.scheduler.caches import merge_caches
from ttci.scheduler.planning.placement import Ask, HostView, place
from ttci.wire.caches import newest_by_host, newest_holders, parse_cache_report
from ttci.wire.envs import EnvRequest, VMRequest
from webhooks.core.caches import job_cache, parse_cache_file


@pytest.mark.parametrize(
    ("text", "key", "path"),
    [
        ("deps:/cache", "deps", "/cache"),
        ("pip-3.11:/root/.cache/pip", "pip-3.11", "/root/.cache/pip"),
        (" node_modules:/work/node_modules ", "node_modules", "/work/node_modules"),
        ("A.b-c_d:/var/cache/x", "A.b-c_d", "/var/cache/x"),
    ],
)
def test_good_caches_parse(text: str, key: str, path: str) -> None:
    spec = parse_cache(text)
    assert (spec.key, spec.path) == (key, path)
    assert CacheSpec.from_dict(spec.to_dict()) == spec == CacheSpec.from_dict(spec.text())


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("deps", "has no ':/path'"),
        (":/cache", "cache key"),
        ("../x:/cache", "cache key"),
        ("a..b:/cache", "cache key"),
        ("a/b:/cache", "cache key"),
        ("-x:/cache", "cache key"),
        ("k" * 65 + ":/cache", "cache key"),
        ("deps:cache", "absolute path"),
        ("deps:/", "absolute path"),
        ("deps:/cache/../etc", ". or .."),
        ("deps:/cache/./x", ". or .."),
        ("deps://cache", "absolute path"),
        ("deps:/cache/", "absolute path"),
        ("deps:/ca che", "absolute path"),
        ("deps:/cache;rm", "absolute path"),
        ("deps:/proc", "system folder /proc"),
        ("deps:/sys/x", "system folder /sys"),
        ("deps:/dev/shm", "system folder /dev"),
        ("deps:/etc/apt", "system folder /etc"),
        ("deps:/usr/local", "system folder /usr"),
        ("deps:/bin", "system folder /bin"),
        ("deps:/boot", "system folder /boot"),
        ("deps:/var", "would hide"),
        ("deps:/root", "would hide"),
        ("deps:/" + "x" * 200, "absolute path"),
    ],
)
def test_bad_caches_are_refused_with_a_clear_error(text: str, says: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_cache(text)
    assert says in e.value.message
    assert e.value.hint


def test_paths_below_hidden_folders_are_fine() -> None:
    for path in ("/var/cache/deps", "/root/.cache", "/tmp/cache", "/home/ci/.m2"):
        assert check_cache_path(path) == path


def test_scope_ids_name_no_text_and_never_collide() -> None:
    hostile = ["../../etc", "a/../../b", "x\0y", "....", "/abs", "%2e%2e"]
    seen = set()
    for owner in ("alice", "bob"):
        for project in ("user:alice", "gitlab:g/p", "gitlab:g/p2", "github:o/r"):
            for key in ("deps", "deps2"):
                sid = CacheScope(owner, project, key).scope_id
                assert len(sid) == 32 and set(sid) <= set("0123456789abcdef")
                seen.add(sid)
    assert len(seen) == 2 * 4 * 2
    # the separator cannot be forged by moving characters between fields
    assert CacheScope("a", "b:c", "d").scope_id != CacheScope("a:b", "c", "d").scope_id
    for text in hostile:  # hostile keys never parse, so they never reach hostd
        with pytest.raises(BadInput):
            CacheScope.from_dict({"owner": "a", "project": "user:a", "key": text})


def test_the_wire_carries_the_cache_and_its_project() -> None:
    req = EnvRequest("e", "debian-12", cache=parse_cache("deps:/cache"))
    assert EnvRequest.from_dict(req.to_dict()).cache == req.cache
    assert "cache" not in EnvRequest("e", "debian-12").to_dict()  # older readers see nothing
    with pytest.raises(BadInput, match="system folder"):
        EnvRequest.from_dict({**req.to_dict(), "cache": "deps:/etc"})
    vm = VMRequest("v1", "e", "n", "alice", "img", cache=req.cache, cache_project="gitlab:g/p")
    back = VMRequest.from_dict(vm.to_dict())
    assert back.cache_scope == CacheScope("alice", "gitlab:g/p", "deps")
    plain = VMRequest("v1", "e", "n", "alice", "img", cache=req.cache)
    assert plain.cache_scope == CacheScope("alice", "user:alice", "deps")  # a user's own


def test_lru_evicts_whole_unused_caches_oldest_first() -> None:
    caches = [
        CacheUse("new", 300.0, 40, False),
        CacheUse("old-busy", 100.0, 50, True),
        CacheUse("old", 200.0, 30, False),
        CacheUse("mid", 250.0, 30, False),
    ]
    assert evictions(caches, total=150, limit=150) == []
    assert evictions(caches, total=151, limit=150) == ["old"]  # the busy one is skipped
    assert evictions(caches, total=200, limit=150) == ["old", "mid"]
    assert evictions(caches, total=1000, limit=0) == ["old", "mid", "new"]  # never the busy one


def test_host_reports_are_checked_and_the_newest_holder_found() -> None:
    sid = CacheScope("a", "user:a", "deps").scope_id
    report = {"held": {sid: 10.0}, "hits": 3, "bytes": 5, "unknown": 1}
    assert parse_cache_report(report) == {"held": {sid: 10.0}, "hits": 3, "bytes": 5}
    for bad in ({"held": {"../x": 1.0}}, {"held": {sid: "now"}}, {"hits": -1}, {"held": []}):
        with pytest.raises(BadInput):
            parse_cache_report(bad)
    held = {"h1": {sid: 10.0}, "h2": {sid: 12.0}, "h3": {}}
    assert newest_holders(sid, held) == {"h2"}
    assert newest_holders("0" * 32, held) == frozenset()


def test_the_scheduler_merges_the_hosts_views() -> None:
    row = {"scope_id": "s", "owner": "a", "project": "user:a", "key": "deps", "hits": 1}
    merged = merge_caches(
        {
            "h1": [{**row, "bytes": 10, "committed_at": 5.0, "commits": 1}],
            "h2": [{**row, "bytes": 20, "committed_at": 9.0, "commits": 2, "in_use": True}],
        }
    )
    assert merged == [
        {
            "owner": "a",
            "project": "user:a",
            "key": "deps",
            "hosts": ["h1", "h2"],
            "bytes": 30,
            "newest_host": "h2",
            "committed_at": 9.0,
            "last_used": 0.0,
            "hits": 2,
            "misses": 0,
            "commits": 3,
            "in_use": True,
        }
    ]


def _host(hid: str, mem: int, caches: frozenset[str] = frozenset(), kvm: bool = False) -> HostView:
    arches = frozenset({"amd64"}) if kvm else frozenset()
    return HostView(hid, Resources(4, mem, 50), frozenset({"img"}), arches, caches=caches)


def test_placement_prefers_the_newest_cache_without_waiting_for_it() -> None:
    sid = CacheScope("a", "user:a", "deps").scope_id
    ask = Ask("vm", "img", "amd64", Resources(1, 512, 4), cache=sid)
    roomy, holder = _host("roomy", 4096), _host("holder", 1024, frozenset({sid}))
    assert place([ask], [roomy, holder]) == {"vm": "holder"}
    assert place([replace(ask, cache="")], [roomy, holder]) == {"vm": "roomy"}  # no cache
    full = _host("holder", 256, frozenset({sid}))  # the holder has no room: start elsewhere
    assert place([ask], [roomy, full]) == {"vm": "roomy"}
    two = [ask, replace(ask, key="vm2")]  # the holder takes what fits, the rest goes on
    assert place(two, [roomy, _host("holder", 600, frozenset({sid}))]) == {
        "vm": "holder",
        "vm2": "roomy",
    }
    kvm = _host("kvm", 1024, kvm=True)  # KVM still comes first (TCG is ~10x slower)
    assert place([ask], [holder, kvm]) == {"vm": "kvm"}


def test_the_pool_knows_who_holds_the_newest_version() -> None:
    held = {"h1": {"s1": 5.0, "s2": 9.0}, "h2": {"s1": 7.0}, "h3": {}}
    assert newest_by_host(held) == {
        "h1": frozenset({"s2"}),
        "h2": frozenset({"s1"}),
        "h3": frozenset(),
    }


def test_gitlab_reads_tt_cache_and_says_what_is_wrong() -> None:
    jv = {"CI_JOB_ID": "7", "CI_PROJECT_PATH": "g/p", "TT_CACHE": "deps:/cache"}
    req = gitlab_env_request(jv, "qemu:debian-12:amd64", Size(1, 512, 0))
    assert req.cache == CacheSpec("deps", "/cache")
    assert gitlab_env_request({**jv, "TT_CACHE": ""}, "img", Size(1, 512, 0)).cache is None
    with pytest.raises(JobError, match="TT_CACHE: cache path /etc"):
        gitlab_env_request({**jv, "TT_CACHE": "deps:/etc"}, "img", Size(1, 512, 0))


def test_github_cache_file_maps_repositories_to_caches() -> None:
    doc = {"repos": {"Octo/App": {"cache": "deps:/cache"}}}
    repos = parse_cache_file(doc)
    assert job_cache("octo/app", repos) == CacheSpec("deps", "/cache")
    assert job_cache("octo/other", repos) is None
    for bad in (
        {"other": {}},
        {"repos": {"noslash": {"cache": "a:/b"}}},
        {"repos": {"o/r": {"cache": "a:/b", "extra": 1}}},
        {"repos": {"o/r": {"cache": 3}}},
        {"repos": {"o/r": {"cache": "a:/proc"}}},
    ):
        with pytest.raises(BadInput):
            parse_cache_file(bad)


def test_the_admin_page_and_metrics_show_each_hosts_caches() -> None:
    counts = {"caches": 2, "hits": 3, "misses": 1, "commits": 4, "evictions": 1}
    hosts = [{"id": "h1", "caches": {**counts, "bytes": 10, "limit_bytes": 20}}, {"id": "h2"}]
    assert cache_rows(hosts) == [{"host": "h1", **counts, "bytes": 10, "limit_bytes": 20}]
    names = {m.name: m for m in cache_metrics([(h["id"], h) for h in hosts])}
    assert names["ttci_host_cache_commits"].samples[0].value == 4
    assert names["ttci_host_cache_limit_bytes"].samples[0].labels == {"host": "h1"}
