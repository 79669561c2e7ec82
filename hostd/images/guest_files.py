"""What the builder puts into every image: the guest agent (ttci's guest modules and its
launcher), the init, systemd units, and the operator's added files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import ttci
from hostd.builders.image_recipe import BuildSpec
from ttci.model.errors import BadInput

__all__ = [
    "AGENT_MODULES",
    "GUEST_DIR",
    "RESOLV_PLACEHOLDER",
    "digest_adds",
    "digest_files",
    "guest_files",
    "install_files",
]

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
RESOLV_PLACEHOLDER = b"# tt: written at boot from tt.dns= (the DNS forwarder of the VM's ENV)\n"
TTCI_DIR = Path(ttci.__file__).resolve().parent
AGENT_MODULES = (
    "__init__.py",
    "wire/__init__.py",
    "wire/agent_protocol.py",
    "agent/__init__.py",
    "agent/main.py",
    "agent/process.py",
)


def guest_files(profile: str) -> dict[str, tuple[int, bytes]]:
    """Files the builder puts into every image: guest path -> (mode, content)."""
    files = {
        f"/usr/lib/tt-agent/ttci/{m}": (0o644, (TTCI_DIR / m).read_bytes()) for m in AGENT_MODULES
    }
    files["/usr/lib/tt-agent/tt-agent.py"] = (0o755, (GUEST_DIR / "tt-agent.py").read_bytes())
    files["/sbin/tt-init"] = (0o755, (GUEST_DIR / "tt-init").read_bytes())
    # Not the build machine's resolver (mmdebstrap copies it in): the guest's init writes the
    # real one at boot from tt.dns= (hostd.builders.net_plan.resolv_conf).
    files["/etc/resolv.conf"] = (0o644, RESOLV_PLACEHOLDER)
    if profile == "systemd":
        files["/etc/systemd/system/tt-agent.service"] = (
            0o644,
            (GUEST_DIR / "tt-agent.service").read_bytes(),
        )
        files["/etc/systemd/network/10-tt-guest.network"] = (
            0o644,
            (GUEST_DIR / "10-tt-guest.network").read_bytes(),
        )
    return files


def digest_files(files: dict[str, tuple[int, bytes]]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        mode, data = files[path]
        h.update(f"{path}\0{mode}\0{len(data)}\0".encode())
        h.update(data)
    h.update((GUEST_DIR / "initrd-init").read_bytes())
    return h.hexdigest()[:16]


def digest_adds(spec: BuildSpec) -> str:
    h = hashlib.sha256()
    for add in spec.adds:
        if not add.src.exists():
            raise BadInput(f"--add source {add.src} does not exist", hint="check the path")
        h.update(f"{add.dest}\0".encode())
        if add.mode is not None:
            h.update(f"mode {add.mode:o}\0".encode())
        paths = [add.src] if add.src.is_file() else sorted(p for p in add.src.rglob("*"))
        for p in paths:
            h.update(f"{p.relative_to(add.src.parent)}\0{p.stat().st_mode}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def install_files(root: Path, spec: BuildSpec, files: dict[str, tuple[int, bytes]]) -> None:
    for dest, (mode, data) in files.items():
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a symlink (resolv.conf) must not lead out of root
        target.write_bytes(data)
        target.chmod(mode)
    if spec.profile == "systemd":
        wants = root / "etc/systemd/system/sysinit.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "tt-agent.service").symlink_to("/etc/systemd/system/tt-agent.service")
        mu = root / "etc/systemd/system/multi-user.target.wants"
        mu.mkdir(parents=True, exist_ok=True)
        link = mu / "systemd-networkd.service"
        if not link.exists():
            link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    for add in spec.adds:
        target = root / add.dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if add.src.is_dir():
            shutil.copytree(add.src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(add.src, target)
        if add.mode is not None:
            target.chmod(add.mode)
