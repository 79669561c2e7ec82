import pytest

from ttci.model.arch import Arch, VirtioBus


def test_every_arch_has_a_complete_row() -> None:
    for arch in Arch:
        row = arch.row
        assert row.debian == arch.value
        assert row.qemu_binary.startswith("qemu-system-")
        assert row.kernel_package.startswith("linux-image-")
        required, _ = arch.initrd_modules()
        assert {"virtio_blk", "virtio_console", "ext4"} <= set(required)


def test_s390x_uses_ccw_everything_else_pci() -> None:
    assert Arch.S390X.row.bus is VirtioBus.CCW
    assert Arch.S390X.virtio_device("blk") == "virtio-blk-ccw"
    assert "virtio_ccw" in Arch.S390X.initrd_modules()[1]
    assert "virtio_pci" not in Arch.S390X.initrd_modules()[0]
    assert Arch.ARM64.virtio_device("serial") == "virtio-serial-pci"


def test_native_is_decided_by_the_host_machine() -> None:
    assert Arch.AMD64.is_native("x86_64")
    assert Arch.I386.is_native("x86_64")
    assert not Arch.ARM64.is_native("x86_64")
    assert Arch.ARM64.is_native("aarch64")


@pytest.mark.parametrize(
    ("alias", "arch"),
    [
        ("x86_64", Arch.AMD64),
        ("aarch64", Arch.ARM64),
        ("ppc64le", Arch.PPC64EL),
        ("armv7l", Arch.ARMHF),
    ],
)
def test_aliases(alias: str, arch: Arch) -> None:
    assert Arch.parse(alias) is arch


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="known: amd64"):
        Arch.parse("mips")
