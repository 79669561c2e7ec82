"""QEMU and qemu-img command lines, built as plain lists (no I/O).

`qemu_argv` is the one builder of direct-boot QEMU command lines (`tt image check`, the
benchmarks and the KVM probe boot); libvirt's domains are built by domain_xml. Both read what
differs per architecture from the arch table (ttci/model/arch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttci.model.arch import Arch
from ttci.wire.agent_protocol import PORT_NAME

__all__ = ["QemuSpec", "overlay_argv", "qemu_argv"]


@dataclass(frozen=True)
class QemuSpec:
    arch: Arch
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    disk: Path | None = None  # None: no disk, no agent, no rng (the KVM probe boots the initrd)
    agent_socket: Path | None = None
    accel: str = "tcg"  # "kvm" or "tcg"
    memory_mib: int = 512
    cpus: int = 1
    ssh_forward_port: int | None = None  # user-mode NIC, restricted, host 127.0.0.1:PORT -> :22
    tb_size_mib: int | None = None


def qemu_argv(spec: QemuSpec) -> list[str]:
    """The command line that boots spec's kernel straight under QEMU, console to a file."""
    row = spec.arch.row
    argv = [row.qemu_binary, "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-machine", row.qemu_machine]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        tcg = "tcg" + (f",tb-size={spec.tb_size_mib}" if spec.tb_size_mib else "")
        argv += ["-accel", tcg]
        if row.qemu_cpu:
            argv += ["-cpu", row.qemu_cpu]
    argv += list(row.firmware_args)
    argv += ["-m", str(spec.memory_mib), "-smp", str(spec.cpus), "-no-reboot"]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline]
    argv += ["-chardev", f"file,id=con0,path={spec.console_log}", "-serial", "chardev:con0"]
    argv += _devices(spec)
    argv += _network(spec)
    argv += ["-monitor", "none"]
    return argv


def _devices(spec: QemuSpec) -> list[str]:
    """The disk, the agent's virtio-serial port and the rng (none for a bare probe boot)."""
    argv: list[str] = []
    if spec.disk is not None:
        argv += [
            "-drive",
            f"file={spec.disk},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
            "-device",
            f"{spec.arch.virtio_device('blk')},drive=disk0",
        ]
    if spec.agent_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=agent0,path={spec.agent_socket},server=on,wait=off",
            "-device",
            spec.arch.virtio_device("serial"),
            "-device",
            f"virtserialport,chardev=agent0,name={PORT_NAME}",
        ]
    if spec.disk is not None:
        argv += [
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            f"{spec.arch.virtio_device('rng')},rng=rng0",
        ]
    return argv


def _network(spec: QemuSpec) -> list[str]:
    if spec.ssh_forward_port is None:
        return ["-net", "none"]
    return [
        "-netdev",
        f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_forward_port}-:22",
        "-device",
        f"{spec.arch.virtio_device('net')},netdev=net0",
    ]


def overlay_argv(base: Path, path: Path, size_gib: int | None = None) -> list[str]:
    """qemu-img's command that makes path a copy-on-write qcow2 overlay of base (the one way
    every VM disk is made); size_gib grows the overlay's virtual size."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)]
    if size_gib is not None:
        argv.append(f"{size_gib}G")
    return argv
