"""Guest architectures: the one table of everything that differs between them. Pure.

One row per architecture holds its names (Debian's, `uname -m`'s and the aliases CI systems use),
how QEMU and libvirt run it (binary, machine, CPU, console, virtio bus, serial target and the
per-arch quirks), and what its images need (kernel package, extra kernel arguments). Adding an
architecture is adding its enum member and its row; `Arch.parse`, the QEMU and libvirt builders,
the image builder and every label or variable parser read this table.
Values measured on QEMU 7.2 and libvirt 9.0 (Debian 12's); why each quirk is there:
docs/facts/qemu-and-libvirt.md.
"""

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
    """Everything that differs between architectures."""

    debian: str  # Debian's name: amd64, arm64, ... (the canonical one)
    uname: str  # what `uname -m` prints in the guest
    aliases: tuple[str, ...]  # more accepted names: GitHub's (X64, ARM64, ...), Go's/GitLab's
    qemu_binary: str  # qemu-system-*
    qemu_package: str  # the Debian package that ships qemu_binary (for "missing tool" hints)
    qemu_user: str  # qemu-user name (binfmt entry qemu-NAME) used when the host is foreign
    machine: str  # machine type, the same name in QEMU and in libvirt's <os><type machine=...>
    cpu: str | None  # QEMU's -cpu under TCG (None: the machine's default); "max" = libvirt's
    #                  <cpu mode='maximum'>
    console: str  # the guest's serial console device (console=...)
    bus: VirtioBus  # virtio transport: device names end in -pci or -ccw
    kernel_package: str
    libvirt_arch: str  # <os><type arch=...>
    libvirt_serial: str  # <serial><target type=...>
    acpi: bool = False  # <features><acpi/>
    # Quirks. machine_props are -machine options, cpu_props properties of the TCG CPU model
    # (cpu_qom_type is that model's QOM type, which libvirt's passthrough -global names).
    machine_props: tuple[str, ...] = ()
    cpu_props: tuple[str, ...] = ()
    cpu_qom_type: str | None = None
    firmware_args: tuple[str, ...] = ()  # QEMU flags for direct boots (libvirt picks firmware)
    extra_cmdline: tuple[str, ...] = ()  # kernel arguments every image of this arch boots with
    host_machines: tuple[str, ...] = ()  # `platform.machine()` values that run it natively

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this architecture is known by, lower case, Debian's first."""
        return tuple(dict.fromkeys(n.lower() for n in (self.debian, self.uname, *self.aliases)))

    @property
    def qemu_machine(self) -> str:
        """QEMU's -machine value: the type and its options."""
        return ",".join((self.machine, *self.machine_props))

    @property
    def qemu_cpu(self) -> str | None:
        """QEMU's -cpu value under TCG: the model and its properties (None: no -cpu)."""
        return ",".join((self.cpu, *self.cpu_props)) if self.cpu else None

    @property
    def libvirt_cpu_mode(self) -> str | None:
        """libvirt's <cpu mode=...> under TCG: `maximum` is QEMU's `max` (None: no <cpu>)."""
        return "maximum" if self.cpu == "max" else None

    @property
    def libvirt_qemu_args(self) -> tuple[str, ...]:
        """The quirks libvirt has no element for, as <qemu:commandline> arguments."""
        args: list[str] = []
        for prop in self.machine_props:
            args += ["-machine", prop]
        for prop in self.cpu_props:
            args += ["-global", f"{self.cpu_qom_type}.{prop}"]
        return tuple(args)


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
        """Accept any name of the table (Debian's, uname's, GitHub's, ...), in any case."""
        try:
            return _BY_NAME[value.strip().lower()]
        except KeyError:
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


_ROWS = (
    ArchRow(
        debian="amd64",
        uname="x86_64",
        aliases=("x64",),  # GitHub's X64
        qemu_binary="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        qemu_user="x86_64",
        machine="q35",
        cpu="max",
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-cloud-amd64",
        libvirt_arch="x86_64",
        libvirt_serial="isa-serial",
        acpi=True,
        host_machines=("x86_64",),
    ),
    ArchRow(
        debian="arm64",  # also GitHub's ARM64 and Go's
        uname="aarch64",
        aliases=(),
        qemu_binary="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        qemu_user="aarch64",
        machine="virt",
        cpu="max",
        # pointer authentication with QEMU's own cheap algorithm: the architected one (QARMA)
        # makes TCG guests several times slower
        cpu_props=("pauth-impdef=on",),
        cpu_qom_type="max-arm-cpu",
        console="ttyAMA0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-cloud-arm64",
        libvirt_arch="aarch64",
        libvirt_serial="system-serial",
        host_machines=("aarch64", "arm64"),
    ),
    ArchRow(
        debian="i386",
        uname="i686",
        aliases=("x86", "386"),  # GitHub's X86, Go's (GitLab runner's) 386
        qemu_binary="qemu-system-i386",
        qemu_package="qemu-system-x86",
        qemu_user="i386",
        machine="q35",
        cpu="max",
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-686",
        libvirt_arch="i686",
        libvirt_serial="isa-serial",
        acpi=True,
        extra_cmdline=("noisapnp",),
        host_machines=("x86_64", "i686"),
    ),
    ArchRow(
        debian="armhf",
        uname="armv7l",
        aliases=("arm",),  # GitHub's ARM, Go's arm
        qemu_binary="qemu-system-arm",
        qemu_package="qemu-system-arm",
        qemu_user="arm",
        machine="virt",
        cpu="max",
        console="ttyAMA0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-armmp-lpae",
        libvirt_arch="armv7l",
        libvirt_serial="system-serial",
    ),
    ArchRow(
        debian="ppc64el",
        uname="ppc64le",  # also Go's
        aliases=(),
        qemu_binary="qemu-system-ppc64",
        qemu_package="qemu-system-ppc",
        qemu_user="ppc64le",
        machine="pseries",
        machine_props=("x-vof=on",),  # Virtual Open Firmware: boots without SLOF, much faster
        cpu=None,
        console="hvc0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-powerpc64le",
        libvirt_arch="ppc64le",
        libvirt_serial="spapr-vio-serial",
    ),
    ArchRow(
        debian="s390x",
        uname="s390x",
        aliases=(),
        qemu_binary="qemu-system-s390x",
        qemu_package="qemu-system-misc",
        qemu_user="s390x",
        machine="s390-ccw-virtio",
        cpu="max",
        console="ttysclp0",
        bus=VirtioBus.CCW,
        kernel_package="linux-image-s390x",
        libvirt_arch="s390x",
        libvirt_serial="sclp-serial",
    ),
    ArchRow(
        debian="riscv64",
        uname="riscv64",
        aliases=(),
        qemu_binary="qemu-system-riscv64",
        qemu_package="qemu-system-misc",
        qemu_user="riscv64",
        machine="virt",
        cpu=None,
        console="ttyS0",
        bus=VirtioBus.PCI,
        kernel_package="linux-image-riscv64",
        libvirt_arch="riscv64",
        libvirt_serial="system-serial",
        firmware_args=("-bios", "default"),
    ),
)

_TABLE: dict[Arch, ArchRow] = {Arch(row.debian): row for row in _ROWS}
_BY_NAME: dict[str, Arch] = {name: arch for arch, row in _TABLE.items() for name in row.names}
if set(_TABLE) != set(Arch) or len(_TABLE) != len(_ROWS):
    raise RuntimeError("every Arch needs exactly one row")
if len(_BY_NAME) != sum(len(r.names) for r in _ROWS):
    raise RuntimeError("a name may mean only one architecture")
