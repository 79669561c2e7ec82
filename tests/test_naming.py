import pytest

from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.naming import ImageName, parse_release, select_by_prefix


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
        ("qemu:debian-12+gui:amd64", "unknown profile"),
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
