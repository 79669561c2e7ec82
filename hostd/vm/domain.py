"""A VM's libvirt domain spec from its state row: kernel command line, disks, NIC, metadata."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from hostd.builders.domain_xml import DomainSpec
from hostd.images.catalogue import Image
from hostd.net.manager import VmNet
from hostd.vm.warm import vcpus_for
from ttci.model.arch import Arch

__all__ = ["vm_domain"]


def vm_domain(  # noqa: PLR0917 - everything a domain is made of
    host_id: str,
    row: dict[str, Any],
    image: Image,
    disk_gib: int,
    vmnet: VmNet,
    accel: str,
    cache_disk: Path | None = None,
) -> DomainSpec:
    """The domain of the VM row: booted from image's kernel and initrd, its disk (and cache
    disk) in its work directory, its tap."""
    workdir = Path(row["workdir"])
    arch = Arch.parse(image.manifest.arch)
    # No token here: QEMU's command line is every local user's to read (ps). The agent
    # takes it from the first HELLO after boot (ttci/agent/main.py).
    cmdline = f"{image.manifest.kernel_cmdline} tt.hostname={row['name']}"
    if disk_gib << 30 > image.manifest.disk_virtual_size:
        cmdline += " tt.resize=1"
    cmdline += f" {vmnet.kernel_arg} net.ifnames=0"
    return DomainSpec(
        name=row["domain"],
        uuid=str(uuid.uuid4()),
        arch=arch,
        kernel=image.file(image.manifest.kernel.path),
        initrd=image.file(image.manifest.initrd.path),
        cmdline=cmdline,
        disk=workdir / "disk.qcow2",
        agent_socket=workdir / "agent.sock",
        console_log=workdir / "console.log",
        memory_mib=row["memory_mib"],
        vcpus=vcpus_for(row["cpus"]),
        accel=accel,
        nic=(vmnet.tap, vmnet.mac),
        cache_disk=cache_disk,
        metadata={
            "host": host_id,
            "vm": row["id"],
            "env": row["env"],
            "name": row["name"],
            "owner": row["owner"],
            "workdir": str(workdir),
        },
    )
