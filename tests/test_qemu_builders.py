"""The QEMU command-line, qemu-img overlay and libvirt domain builders, per architecture. Pure."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hostd.builders.domain_xml import QEMU_NS, DomainSpec, domain_xml, metadata_from_xml
from hostd.builders.qemu_argv import QemuSpec, overlay_argv, qemu_argv
from ttci.model.arch import Arch


def _domain(arch: Arch, accel: str = "tcg") -> ET.Element:
    spec = DomainSpec(
        name="tt-x",
        uuid="00000000-0000-0000-0000-000000000001",
        arch=arch,
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="console=x",
        disk=Path("/d.qcow2"),
        agent_socket=Path("/s.sock"),
        console_log=Path("/c.log"),
        memory_mib=512,
        vcpus=2,
        accel=accel,
        nic=("tap0", "52:54:00:00:00:01"),
        metadata={"env": "e1"},
    )
    xml = domain_xml(spec)
    assert metadata_from_xml(xml) == {"env": "e1"}
    return ET.fromstring(xml)  # noqa: S314 - our own output


@pytest.mark.parametrize("arch", list(Arch))
def test_domain_follows_the_arch_row(arch: Arch) -> None:
    row = arch.row
    dom = _domain(arch)
    os_type = dom.find("os/type")
    assert os_type is not None
    assert os_type.get("arch") == row.libvirt_arch and os_type.get("machine") == row.machine
    serial = dom.find("devices/serial/target")
    assert serial is not None and serial.get("type") == row.libvirt_serial
    cpu = dom.find("cpu")
    assert (cpu.get("mode") if cpu is not None else None) == row.libvirt_cpu_mode
    assert (dom.find("features/acpi") is not None) == row.acpi
    args = tuple(a.get("value") for a in dom.iter(f"{{{QEMU_NS}}}arg"))
    assert args == row.libvirt_qemu_args
    assert dom.get("type") == "qemu"


def test_kvm_domain_passes_the_host_cpu_through() -> None:
    dom = _domain(Arch.AMD64, accel="kvm")
    cpu = dom.find("cpu")
    assert dom.get("type") == "kvm" and cpu is not None and cpu.get("mode") == "host-passthrough"


def test_arm64_and_ppc64el_quirks_in_both_builders() -> None:
    def argv(arch: Arch) -> str:
        spec = QemuSpec(
            arch=arch,
            kernel=Path("/k"),
            initrd=Path("/i"),
            cmdline="",
            console_log=Path("/c"),
            disk=Path("/d"),
            agent_socket=Path("/s"),
        )
        return " ".join(qemu_argv(spec))

    assert "-cpu max,pauth-impdef=on" in argv(Arch.ARM64)
    assert "-machine pseries,x-vof=on" in argv(Arch.PPC64EL)
    assert "-cpu" not in argv(Arch.PPC64EL)
    assert "-global max-arm-cpu.pauth-impdef=on" in " ".join(
        a.get("value") or "" for a in _domain(Arch.ARM64).iter(f"{{{QEMU_NS}}}arg")
    )


def test_probe_boot_is_kernel_and_initrd_only() -> None:
    spec = QemuSpec(
        arch=Arch.AMD64,
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="console=ttyS0 tt.probe=1",
        console_log=Path("/c"),
        accel="kvm",
        memory_mib=256,
    )
    argv = qemu_argv(spec)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-machine q35 -accel kvm -cpu host" in joined and "-m 256" in joined
    assert "-serial chardev:con0" in joined and argv[-2:] == ["-monitor", "none"]
    assert "-drive" not in joined and "virtserialport" not in joined and "rng" not in joined


def test_overlay_is_one_command() -> None:
    assert overlay_argv(Path("/img/disk.qcow2"), Path("/vm/disk.qcow2")) == [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "/img/disk.qcow2",
        "/vm/disk.qcow2",
    ]
    assert overlay_argv(Path("/b"), Path("/o"), 20)[-3:] == ["/b", "/o", "20G"]
