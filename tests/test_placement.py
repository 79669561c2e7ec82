"""Placement and ENV requests: pure, fast."""

import pytest

from ttci.model.errors import BadInput
from ttci.model.resources import Resources, shortfall
from ttci.scheduler.planning.envspec import vm_names
from ttci.scheduler.planning.placement import Ask, HostView, NoPlacement, place
from ttci.wire.envs import EnvRequest, parse_duration

IMG = "qemu:debian-12:arm64"


def host(
    hid: str,
    cpus: float = 4,
    mem: int = 4096,
    images: tuple[str, ...] = (IMG,),
    disk: int = 100,
    **kw: object,
) -> HostView:
    free = Resources(cpus, mem, disk)
    return HostView(id=hid, free=free, images=frozenset(images), **kw)  # type: ignore[arg-type]


def ask(key: str, mem: int = 1024, image: str = IMG) -> Ask:
    return Ask(key=key, image=image, arch=image.rsplit(":", 1)[1], need=Resources(1, mem, 4))


def test_spreads_over_hosts_by_free_memory() -> None:
    out = place([ask("a"), ask("b"), ask("c"), ask("d")], [host("h1"), host("h2")])
    assert sorted(out.values()) == ["h1", "h1", "h2", "h2"]


def test_native_kvm_host_wins_for_its_arch() -> None:
    hosts = [host("tcg-big", mem=65536), host("kvm-arm", kvm_arches=frozenset({"arm64"}))]
    assert place([ask("a")], hosts) == {"a": "kvm-arm"}


def test_only_hosts_with_the_image_and_up_and_not_draining() -> None:
    hosts = [
        host("no-image", images=()),
        host("down", up=False),
        host("drain", draining=True),
        host("ok", mem=2048),
    ]
    assert place([ask("a")], hosts) == {"a": "ok"}


def test_a_pool_too_small_says_how_much_is_free() -> None:
    with pytest.raises(
        NoPlacement,
        match=r"3 VM\(s\) of image qemu:debian-12:arm64 need "
        r"3 CPU, 9000 MiB memory, 12 GiB disk in all; free on the hosts that "
        r"have it: 8 CPU, 8192 MiB memory",
    ):
        place([ask(str(i), mem=3000) for i in range(3)], [host("h1"), host("h2")])


def test_unknown_image_lists_the_pool() -> None:
    with pytest.raises(NoPlacement, match="no host that is up has image") as e:
        place([ask("a", image="qemu:debian-13:s390x")], [host("h1")])
    assert IMG in (e.value.hint or "")


def test_ten_thousand_vms_place_quickly() -> None:
    hosts = [host(f"h{i}", cpus=10_000, mem=10_000_000, disk=10_000) for i in range(20)]
    out = place([ask(f"vm-{i}", mem=256) for i in range(10_000)], hosts)
    assert len(out) == 10_000
    counts = sorted({h: list(out.values()).count(h) for h in set(out.values())}.values())
    assert counts[-1] - counts[0] <= 1  # evenly spread


def test_shortfall_sentence() -> None:
    assert shortfall(Resources(1, 512, 4), Resources(4, 4096, 40), Resources(3, 0, 0)) is None
    msg = shortfall(Resources(2, 512, 4), Resources(4, 4096, 40), Resources(3, 0, 0))
    assert msg == (
        "needs 2 CPU, 512 MiB memory, 4 GiB disk; free 1 CPU, 4096 MiB memory, "
        "40 GiB disk (of 4 CPU, 4096 MiB memory, 40 GiB disk)"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), (600, 600)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["forever", "5s", "31d", "-1h"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(BadInput):
        parse_duration(bad)


def test_env_vm_names_follow_images_and_replicas() -> None:
    images = ["qemu:debian-12:amd64", "qemu:debian-12:arm64", "qemu:debian-12+systemd:amd64"]
    req = EnvRequest.from_dict({"name": "ci-1", "os_prefix": "debian-12", "dup_each": 2})
    assert [n for n, _ in vm_names(req, images)] == [  # in image-name order
        "debian-12-systemd-amd64-1",
        "debian-12-systemd-amd64-2",
        "debian-12-amd64-1",
        "debian-12-amd64-2",
        "debian-12-arm64-1",
        "debian-12-arm64-2",
    ]
    single = EnvRequest.from_dict({"name": "ci-2", "os_prefix": "qemu:debian-12:arm"})
    assert vm_names(single, images) == [("debian-12-arm64", "qemu:debian-12:arm64")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"os_prefix": "x"}, "lacks 'name'"),
        ({"name": "Bad!", "os_prefix": "x"}, "not valid"),
        ({"name": "a", "os_prefix": "x", "cpus": "many"}, "malformed"),
        ({"name": "a", "os_prefix": "x", "dup_each": 0}, "--dup-each 0"),
        ({"name": "a", "os_prefix": ","}, "empty"),
        ({"name": "a", "os_prefix": "x", "origin": "gitlab"}, "origin must be an object"),
        ({"name": "a", "os_prefix": "x", "origin": {"kind": "svn"}}, "origin.kind 'svn'"),
        ({"name": "a", "os_prefix": "x", "origin": {"who": "me"}}, "unknown key 'who'"),
        ({"name": "a", "os_prefix": "x", "origin": {"url": "ftp://x"}}, "not an http"),
    ],
)
def test_bad_env_requests(body: dict[str, object], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        EnvRequest.from_dict(body)


def test_env_origin_defaults_to_cli_and_keeps_ci_links() -> None:
    assert EnvRequest.from_dict({"name": "a", "os_prefix": "x"}).origin == {"kind": "cli"}
    origin = {"kind": "gitlab", "job": 42, "url": "https://gitlab.example/p/-/jobs/42"}
    req = EnvRequest.from_dict({"name": "a", "os_prefix": "x", "origin": origin})
    assert req.origin == {**origin, "job": "42"}
