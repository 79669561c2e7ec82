"""Boot an image straight under QEMU (no libvirt): used by `tt image check` and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hostd.builders.qemu_argv import QemuSpec, qemu_argv
from hostd.vm.agent_client import AgentClient
from hostd.vm.disk import create_overlay
from ttci.infra.proc import need, spawn, stop
from ttci.model.arch import Arch
from ttci.model.errors import BootError
from ttci.model.manifest import Manifest

__all__ = ["DirectVM", "boot"]

log = logging.getLogger("hostd.vm.direct_vm")


@dataclass
class DirectVM:
    workdir: Path
    proc: subprocess.Popen[bytes]
    agent_socket: Path
    console_log: Path
    token: str
    started: float

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def connect(self, timeout: float = 60.0) -> AgentClient:
        """Wait for the agent; a VM that exits or times out raises BootError with its console."""
        try:
            return AgentClient.connect(self.agent_socket, token=self.token, timeout=timeout)
        except BootError as e:
            state = "exited" if self.proc.poll() is not None else "still running"
            raise BootError(
                f"{e}; qemu {state}. Console:\n{self.console_tail()}",
                hint="look at the console lines above; rebuild the image if it does not boot",
            ) from None


@contextlib.contextmanager
def boot(
    manifest: Manifest,
    image_dir: Path,
    *,
    accel: str = "tcg",
    memory_mib: int = 512,
    ssh_forward_port: int | None = None,
    extra_cmdline: str = "",
) -> Iterator[DirectVM]:
    """Boot a throw-away VM of the image on a fresh overlay; kill it and remove all on exit."""
    arch = Arch.parse(manifest.arch)
    need(arch.qemu_binary())
    work = Path(tempfile.mkdtemp(prefix="tt-vm-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        disk = work / "disk.qcow2"
        create_overlay(image_dir / manifest.disk.path, disk)
        token = secrets.token_hex(16)
        sock, console = work / "agent.sock", work / "console.log"
        cmdline = f"{manifest.kernel_cmdline} {extra_cmdline}".strip()  # token: the first HELLO
        spec = QemuSpec(
            arch=arch,
            kernel=image_dir / manifest.kernel.path,
            initrd=image_dir / manifest.initrd.path,
            disk=disk,
            cmdline=cmdline,
            agent_socket=sock,
            console_log=console,
            accel=accel,
            memory_mib=memory_mib,
            ssh_forward_port=ssh_forward_port,
        )
        argv = qemu_argv(spec)
        started = time.monotonic()
        proc = spawn(argv, log_path=work / "qemu.err")
        yield DirectVM(work, proc, sock, console, token, started)
    finally:
        if proc is not None:
            stop(proc, grace=0)
        shutil.rmtree(work, ignore_errors=True)
