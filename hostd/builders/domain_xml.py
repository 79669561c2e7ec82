"""libvirt domain XML for one VM, built as a string from plain values (no I/O).

What differs per architecture comes from the arch table (ttci/model/arch.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ttci.model.arch import Arch
from ttci.wire.agent_protocol import PORT_NAME

__all__ = ["GENID_ARCHES", "QEMU_NS", "TT_NS", "DomainSpec", "domain_xml", "metadata_from_xml"]

TT_NS = "https://ttci.example/xmlns/vm/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# libvirt's <genid> (QEMU's vmgenid, an ACPI device) exists for x86 guests only. A VM
# generation ID changes when a VM is cloned from a snapshot: guest kernels with the vmgenid
# driver then reseed their RNG (hostd gives each warm clone a new one; docs/facts/warm-start.md).
GENID_ARCHES = ("x86_64", "i686")


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    arch: Arch
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    agent_socket: Path
    console_log: Path
    memory_mib: int
    vcpus: int
    accel: str = "tcg"  # "kvm" or "tcg"
    emulator: str | None = None
    nic: tuple[str, str] | None = None  # (tap made by hostd or "", MAC): type='ethernet' NIC
    metadata: dict[str, str] = field(default_factory=dict)
    cache_disk: Path | None = None  # a cache volume's clone (qcow2): a second virtio disk


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def domain_xml(spec: DomainSpec) -> str:
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace("tt", TT_NS)
    dom = ET.Element("domain", {"type": "kvm" if spec.accel == "kvm" else "qemu"})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    if spec.arch.row.libvirt_arch in GENID_ARCHES:
        _sub(dom, "genid")  # libvirt picks one; a clone's is set anew (save_image.clone_xml)
    meta = _sub(dom, "metadata")
    tt = ET.SubElement(meta, f"{{{TT_NS}}}vm")
    for key, value in sorted(spec.metadata.items()):
        ET.SubElement(tt, f"{{{TT_NS}}}{key}").text = value
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    _machine(dom, spec)
    _sub(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    _devices(_sub(dom, "devices"), spec)
    if spec.arch.row.libvirt_qemu_args:
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in spec.arch.row.libvirt_qemu_args:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    return ET.tostring(dom, encoding="unicode")


def _machine(dom: ET.Element, spec: DomainSpec) -> None:
    """<os> (machine and direct kernel boot), <features> and <cpu>."""
    row = spec.arch.row
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=row.libvirt_arch, machine=row.machine)
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "initrd", str(spec.initrd))
    _sub(os_el, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    if row.acpi:
        _sub(features, "acpi")
    if spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    elif row.libvirt_cpu_mode:
        _sub(dom, "cpu", mode=row.libvirt_cpu_mode)


def _devices(dev: ET.Element, spec: DomainSpec) -> None:
    """Disk, console, the agent's channel, NIC and rng; no USB, no balloon."""
    if spec.emulator:
        _sub(dev, "emulator", spec.emulator)
    disk = _sub(dev, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    _sub(disk, "source", file=str(spec.disk))
    _sub(disk, "target", dev="vda", bus="virtio")
    if spec.cache_disk is not None:  # its data outlives the VM: flushes are honoured
        cache = _sub(dev, "disk", type="file", device="disk")
        _sub(cache, "driver", name="qemu", type="qcow2", cache="writeback", discard="unmap")
        _sub(cache, "source", file=str(spec.cache_disk))
        _sub(cache, "target", dev="vdb", bus="virtio")
        _sub(cache, "serial", "tt-cache")  # hostd/cache/guest.py finds it by this
    serial = _sub(dev, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log))
    _sub(serial, "target", type=spec.arch.row.libvirt_serial)
    chan = _sub(dev, "channel", type="unix")
    _sub(chan, "source", mode="bind", path=str(spec.agent_socket))
    _sub(chan, "target", type="virtio", name=PORT_NAME)
    if spec.nic:
        iface = _sub(dev, "interface", type="ethernet")
        _sub(iface, "mac", address=spec.nic[1])
        if spec.nic[0]:  # else libvirt makes an unconnected tap (templates, restore self-tests)
            _sub(iface, "target", dev=spec.nic[0], managed="no")
        _sub(iface, "model", type="virtio")
        _sub(iface, "driver", name="qemu")  # userspace virtio-net: no vhost-net needed
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(dev, "controller", type="usb", model="none")
    _sub(dev, "memballoon", model="none")


def metadata_from_xml(xml: str) -> dict[str, str]:
    """Our metadata of a domain (empty when the domain is not ours)."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML about our own domains
    node = root.find(f"metadata/{{{TT_NS}}}vm")
    if node is None:
        return {}
    return {child.tag.split("}", 1)[1]: child.text or "" for child in node}
