"""Pick the accelerator: KVM only where a probe boot proves it works (PVM hosts hang), else TCG."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from hostd.builders.qemu_argv import QemuSpec, qemu_argv
from hostd.images.catalogue import Image
from ttci.infra.proc import spawn, stop
from ttci.model.arch import Arch

__all__ = [
    "CACHE_FILE",
    "MARKER",
    "PROBE_TIMEOUT_S",
    "choose_accel",
    "kvm_usable_device",
    "probe_kvm",
]

log = logging.getLogger("hostd.vm.accel")
PROBE_TIMEOUT_S = 10.0
CACHE_FILE = Path("/run/ttci/kvm-probe.json")  # per boot of the host: /run is a tmpfs
MARKER = b"TT-PROBE-OK"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable_device() -> str | None:
    """Why KVM cannot be used, or None when /dev/kvm opens."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def probe_kvm(image: Image, cache_file: Path | None = CACHE_FILE) -> tuple[bool, str]:
    """Boot image's kernel+initrd under KVM to a marker the initrd prints, with a timeout.

    Returns:
        (usable, why). The answer is cached per boot of the host.
    """
    arch = Arch.parse(image.manifest.arch)
    if not arch.is_native():
        return False, f"{arch.value} is foreign on this host"
    why = kvm_usable_device()
    if why:
        return False, why
    key = f"{_boot_id()}:{image.manifest.kernel.sha256}"
    if cache_file and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return bool(cached["kvm"]), str(cached["why"]) + " (cached)"
        except (OSError, ValueError, KeyError):
            pass
    ok, why = _probe_boot(image, arch)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "kvm": ok, "why": why}))
    return ok, why


def _probe_boot(image: Image, arch: Arch) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="tt-kvm-probe-") as tmp:
        log_path = Path(tmp) / "console.log"
        spec = QemuSpec(
            arch=arch,
            kernel=image.file(image.manifest.kernel.path),
            initrd=image.file(image.manifest.initrd.path),
            cmdline=f"console={arch.row.console} quiet tt.probe=1 panic=-1",
            console_log=log_path,
            accel="kvm",
            memory_mib=256,
        )
        t0 = time.monotonic()
        err_path = Path(tmp) / "qemu.err"
        proc = spawn(qemu_argv(spec), log_path=err_path)
        try:
            while time.monotonic() - t0 < PROBE_TIMEOUT_S:
                if log_path.exists() and MARKER in log_path.read_bytes():
                    return True, f"probe boot reached its marker in {time.monotonic() - t0:.1f} s"
                if proc.poll() is not None:
                    text = err_path.read_text(errors="replace").strip()[-300:]
                    return False, f"probe boot failed: {text or 'qemu exited'}"
                time.sleep(0.05)
            return False, f"probe boot did not reach its marker in {PROBE_TIMEOUT_S:.0f} s"
        finally:
            stop(proc, grace=0)


def choose_accel(image: Image) -> tuple[str, str]:
    """("kvm"|"tcg", why); the probe's answer is cached per host boot in /run/ttci."""
    ok, why = probe_kvm(image)
    return ("kvm" if ok else "tcg"), why
