"""Guest architectures: one table row per architecture, pure mappings only (no I/O)."""

from __future__ import annotations

import enum
import platform
from dataclasses import dataclass

__all__ = ["Arch", "ArchRow", "VirtioBus"]


class VirtioBus(enum.StrEnum):
    PCI = "pci"
    CCW = "ccw"


@dataclass(frozen=True)
class ArchRow:
    """Everything that differs between architectures, measured on QEMU 7.2 (see DESIGN.md)."""

    debian: str  # Debian's name: amd64, arm64, ...
    uname: str  # what `uname -m` prints in the guest
    qemu_binary: str  # qemu-system-*
    qemu_user: str  # qemu-user name (binfmt entry qemu-NAME) used when the host is foreign
    machine: str
    cpu: str | None
    console: str
    bus: VirtioBus
    kernel_package: str
    libvirt_arch: str
    extra_cmdline: tuple[str, ...] = ()
    extra_qemu: tuple[str, ...] = ()  # flags with no libvirt element (passthrough there)
    host_machines: tuple[str, ...] = ()  # `platform.machine()` values that run it natively


_REQUIRED_MODULES = ("virtio_blk", "virtio_console", "ext4")
_OPTIONAL_MODULES = ("virtio_mmio", "virtio_net", "virtio_rng", "crc32c_generic")


class Arch(enum.StrEnum):
    AMD64 = "amd64"
    ARM64 = "arm64"
    I386 = "i386"
    ARMHF = "armhf"
    PPC64EL = "ppc64el"
    S390X = "s390x"
    RISCV64 = "riscv64"

    @classmethod
    def parse(cls, value: str) -> Arch:
        """Accept Debian names and common aliases (x86_64, aarch64, ...)."""
        key = value.strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown architecture {value!r}; known: {known}") from None

    @property
    def row(self) -> ArchRow:
        return _TABLE[self]

    def qemu_binary(self) -> str:
        return self.row.qemu_binary

    def is_native(self, host_machine: str | None = None) -> bool:
        """True when the host CPU runs this architecture without emulation."""
        machine = host_machine if host_machine is not None else platform.machine()
        return machine in self.row.host_machines

    def initrd_modules(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) modules the initrd loads: the disk and agent port must work."""
        if self.row.bus is VirtioBus.CCW:
            # Debian builds virtio_ccw in (CONFIG_S390_GUEST=y, a bool: not in modules.builtin)
            return _REQUIRED_MODULES, ("virtio_ccw", *_OPTIONAL_MODULES)
        return ("virtio_pci", *_REQUIRED_MODULES), _OPTIONAL_MODULES

    def virtio_device(self, kind: str) -> str:
        """QEMU device name for a virtio device kind (blk, serial, net, rng) on this arch."""
        return f"virtio-{kind}-{self.row.bus.value}"


_ALIASES = {
    "x86_64": "amd64",
    "x64": "amd64",
    "aarch64": "arm64",
    "i686": "i386",
    "x86": "i386",
    "armv7l": "armhf",
    "arm": "armhf",
    "ppc64le": "ppc64el",
}

_TABLE: dict[Arch, ArchRow] = {
    Arch.AMD64: ArchRow(
        debian="amd64",
        uname="x86_64",
        qemu_binary="qemu-system-x86_64",
        qemu_user="x86_64",
        machine="q35",
        cpu="max",
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-cloud-amd64",
        libvirt_arch="x86_64",
        host_machines=("x86_64",),
    ),
    Arch.ARM64: ArchRow(
        debian="arm64",
        uname="aarch64",
        qemu_binary="qemu-system-aarch64",
        qemu_user="aarch64",
        machine="virt",
        cpu="max,pauth-impdef=on",
        console="ttyAMA0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-cloud-arm64",
        libvirt_arch="aarch64",
        host_machines=("aarch64", "arm64"),
    ),
    Arch.I386: ArchRow(
        debian="i386",
        uname="i686",
        qemu_binary="qemu-system-i386",
        qemu_user="i386",
        machine="q35",
        cpu="max",
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-686",
        libvirt_arch="i686",
        extra_cmdline=("noisapnp",),
        host_machines=("x86_64", "i686"),
    ),
    Arch.ARMHF: ArchRow(
        debian="armhf",
        uname="armv7l",
        qemu_binary="qemu-system-arm",
        qemu_user="arm",
        machine="virt",
        cpu="max",
        console="ttyAMA0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-armmp-lpae",
        libvirt_arch="armv7l",
    ),
    Arch.PPC64EL: ArchRow(
        debian="ppc64el",
        uname="ppc64le",
        qemu_binary="qemu-system-ppc64",
        qemu_user="ppc64le",
        machine="pseries,x-vof=on",
        cpu=None,
        console="hvc0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-powerpc64le",
        libvirt_arch="ppc64le",
    ),
    Arch.S390X: ArchRow(
        debian="s390x",
        uname="s390x",
        qemu_binary="qemu-system-s390x",
        qemu_user="s390x",
        machine="s390-ccw-virtio",
        cpu="max",
        console="ttysclp0",
        bus=VirtioBus.CCW,
        kernel_package="linux-image-s390x",
        libvirt_arch="s390x",
    ),
    Arch.RISCV64: ArchRow(
        debian="riscv64",
        uname="riscv64",
        qemu_binary="qemu-system-riscv64",
        qemu_user="riscv64",
        machine="virt",
        cpu=None,
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-riscv64",
        libvirt_arch="riscv64",
        extra_qemu=("-bios", "default"),
    ),
}
