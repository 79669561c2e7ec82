import pytest

from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.naming import (
    ImageName,
    Target,
    image_targets,
    images_serving,
    match_os,
    parse_os,
    parse_release,
    parse_target,
    select_by_prefix,
)


def test_image_name_round_trip() -> None:
    n = ImageName.parse("qemu:debian-12:arm64")
    assert n == ImageName("qemu", "debian-12", Arch.ARM64)
    assert str(n) == "qemu:debian-12:arm64"
    assert n.os == "debian"
    assert n.dirname == "qemu_debian-12_arm64"


def test_profile_and_alias() -> None:
    n = ImageName.parse("QEMU:Debian-12+systemd:x86_64")
    assert n.arch is Arch.AMD64
    assert n.profile == "systemd"
    assert str(n) == "qemu:debian-12+systemd:amd64"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("debian-12", "does not parse"),
        ("qemu:debian-12:sparc", "unknown architecture"),
        ("docker:debian-12:amd64", "unknown engine"),
        ("qemu:debian-12+9gui:amd64", "neither a profile nor a recipe name"),
    ],
)
def test_bad_names_say_why(text: str, why: str) -> None:
    with pytest.raises(BadInput, match=why) as e:
        ImageName.parse(text)
    assert e.value.hint


def test_releases() -> None:
    assert parse_release("debian-12").suite == "bookworm"
    assert parse_release("debian-14").testing
    with pytest.raises(BadInput, match="unknown release") as e:
        parse_release("ubuntu-24.04")
    assert "debian-12" in (e.value.hint or "")


def test_prefix_selection_like_tt() -> None:
    names = ["qemu:debian-12:amd64", "qemu:debian-12:arm64", "qemu:debian-13:amd64"]
    assert select_by_prefix(names, "DEBIAN-12") == names[:2]
    assert select_by_prefix(names, "qemu:debian-13,debian-12:arm") == names[1:]
    assert select_by_prefix(names, "centos") == []


# -- the one target grammar: [ENGINE:]OS-VERSION[+PROFILE][:ARCH] ----------------------------


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("debian-12:arm64", Target("debian-12", Arch.ARM64)),
        ("qemu:debian-12:arm64", Target("debian-12", Arch.ARM64)),
        ("qemu:debian-12+systemd:amd64", Target("debian-12", Arch.AMD64, "systemd")),
        ("Debian-13:X64", Target("debian-13", Arch.AMD64)),
        (" debian-14:riscv64 ", Target("debian-14", Arch.RISCV64)),
        ("debian-12", Target("debian-12", Arch.S390X)),  # the default architecture
    ],
)
def test_target_grammar(text: str, target: Target) -> None:
    assert parse_target(text, default_arch=Arch.S390X) == target


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("profile", ["agent", "systemd"])
def test_every_target_round_trips_through_every_spelling(arch: Arch, profile: str) -> None:
    t = Target("debian-12", arch, profile)
    for name in arch.row.names:
        for spelling in (f"{t.os}:{name}", f"qemu:{t.os}:{name.upper()}"):
            assert parse_target(spelling) == t
    assert parse_target(str(t)) == t and parse_target(t.os_prefix) == t
    assert ImageName.parse(str(t.image())).target == t
    assert str(t.image()) == f"qemu:{t.os_prefix}"
    assert t.label == f"{t.os}/{arch.value}" and "+" not in t.slug


def test_os_words() -> None:
    assert match_os("debian-12") == ("debian-12", None)
    assert match_os("Debian-12+systemd") == ("debian-12", "systemd")
    for not_os in ("debian", "ubuntu-latest", "debian 12", "x64", "debian-12:arm64", "db-app"):
        assert match_os(not_os) is None
    with pytest.raises(BadInput, match="TT_OS 'debian' is not an OS release") as e:
        parse_os("debian", "TT_OS")
    assert "debian-12" in (e.value.hint or "")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("debian-12", "does not name an OS and architecture"),  # no default architecture
        ("debian-12:arm64:extra", "does not name an OS and architecture"),
        ("qemu", "does not name an OS and architecture"),
        ("ubuntu:22.04", "image 'ubuntu' is not an OS release"),
        ("debian-12:vax", "image 'debian-12:vax': unknown architecture 'vax'"),
    ],
)
def test_bad_targets_say_which_part_is_wrong(text: str, why: str) -> None:
    with pytest.raises(BadInput, match=why) as e:
        parse_target(text, what="image")
    assert e.value.hint


def test_which_images_serve_a_target() -> None:
    images = ["qemu:debian-12:amd64", "qemu:debian-12+systemd:amd64", "not an image"]
    assert images_serving(Target("debian-12", Arch.AMD64), images) == ["qemu:debian-12:amd64"]
    assert images_serving(Target("debian-12", Arch.AMD64, "systemd"), images) == [images[1]]
    assert images_serving(Target("debian-13", Arch.AMD64), images) == []
    assert list(image_targets(images)) == images[:2]


def test_the_source_is_for_messages_only() -> None:
    assert Target("debian-12", Arch.AMD64, source="image") == Target("debian-12", Arch.AMD64)
