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


# -- the one table: every name round-trips, quirks reach both QEMU and libvirt ---------------
ALL_NAMES = [(name, arch) for arch in Arch for name in arch.row.names]


@pytest.mark.parametrize(("name", "arch"), ALL_NAMES)
def test_every_name_of_the_table_parses_in_any_case(name: str, arch: Arch) -> None:
    for spelling in (name, name.upper(), f" {name.capitalize()} "):
        assert Arch.parse(spelling) is arch
    assert Arch.parse(arch.value).row.debian == arch.value


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        # GitHub's runner architectures (runs-on labels, runner.arch)
        ("X64", Arch.AMD64),
        ("X86", Arch.I386),
        ("ARM", Arch.ARMHF),
        ("ARM64", Arch.ARM64),
        # uname -m
        ("x86_64", Arch.AMD64),
        ("i686", Arch.I386),
        ("aarch64", Arch.ARM64),
        ("armv7l", Arch.ARMHF),
        ("ppc64le", Arch.PPC64EL),
        ("s390x", Arch.S390X),
        ("riscv64", Arch.RISCV64),
        # Go's GOARCH (gitlab-runner's architecture names)
        ("386", Arch.I386),
        ("amd64", Arch.AMD64),
        ("arm", Arch.ARMHF),
    ],
)
def test_ci_systems_names(name: str, arch: Arch) -> None:
    assert Arch.parse(name) is arch


def test_no_name_means_two_architectures() -> None:
    names = [n for _, n in ((a, n) for a in Arch for n in a.row.names)]
    assert len(names) == len(set(names))
    assert all(a.row.names[0] == a.value for a in Arch)


def test_quirks_reach_qemu_and_libvirt_from_one_row() -> None:
    arm64, ppc = Arch.ARM64.row, Arch.PPC64EL.row
    assert arm64.qemu_cpu == "max,pauth-impdef=on"
    assert arm64.libvirt_qemu_args == ("-global", "max-arm-cpu.pauth-impdef=on")
    assert ppc.qemu_machine == "pseries,x-vof=on" and ppc.machine == "pseries"
    assert ppc.libvirt_qemu_args == ("-machine", "x-vof=on")
    assert ppc.qemu_cpu is None and ppc.libvirt_cpu_mode is None
    assert Arch.AMD64.row.libvirt_cpu_mode == "maximum" and Arch.AMD64.row.acpi
    for arch in Arch:
        row = arch.row
        assert not row.cpu_props or row.cpu_qom_type, f"{arch}: -global needs the CPU's type"
        assert row.cpu in (None, "max"), f"{arch}: libvirt knows only `max` as a CPU mode"
        assert row.qemu_cpu is None or row.qemu_cpu.startswith(row.cpu or "")


def test_missing_qemu_hints_name_the_package_from_the_table() -> None:
    from ttci.infra.proc import TOOL_PACKAGES

    for arch in Arch:
        assert TOOL_PACKAGES[arch.qemu_binary()] == arch.row.qemu_package
    assert TOOL_PACKAGES["qemu-system-aarch64"] == "qemu-system-arm"
