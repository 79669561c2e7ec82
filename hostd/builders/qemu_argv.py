"""QEMU command lines for direct kernel boot, built as plain lists (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttci.model.arch import Arch
from ttci.wire.agent_protocol import PORT_NAME

__all__ = ["QemuSpec", "qemu_argv"]


@dataclass(frozen=True)
class QemuSpec:
    arch: Arch
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str
    agent_socket: Path
    console_log: Path
    accel: str = "tcg"  # "kvm" or "tcg"
    memory_mib: int = 512
    cpus: int = 1
    ssh_forward_port: int | None = None  # user-mode NIC, restricted, host 127.0.0.1:PORT -> :22
    tb_size_mib: int | None = None


def qemu_argv(spec: QemuSpec) -> list[str]:
    row = spec.arch.row
    argv = [row.qemu_binary, "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-machine", row.machine]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        tcg = "tcg" + (f",tb-size={spec.tb_size_mib}" if spec.tb_size_mib else "")
        argv += ["-accel", tcg]
        if row.cpu:
            argv += ["-cpu", row.cpu]
    argv += list(row.extra_qemu)
    argv += ["-m", str(spec.memory_mib), "-smp", str(spec.cpus), "-no-reboot"]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline]
    argv += ["-chardev", f"file,id=con0,path={spec.console_log}", "-serial", "chardev:con0"]
    argv += [
        "-drive",
        f"file={spec.disk},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
        "-device",
        f"{spec.arch.virtio_device('blk')},drive=disk0",
        "-chardev",
        f"socket,id=agent0,path={spec.agent_socket},server=on,wait=off",
        "-device",
        spec.arch.virtio_device("serial"),
        "-device",
        f"virtserialport,chardev=agent0,name={PORT_NAME}",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        f"{spec.arch.virtio_device('rng')},rng=rng0",
    ]
    if spec.ssh_forward_port is not None:
        argv += [
            "-netdev",
            f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_forward_port}-:22",
            "-device",
            f"{spec.arch.virtio_device('net')},netdev=net0",
        ]
    else:
        argv += ["-net", "none"]
    argv += ["-monitor", "none"]
    return argv
