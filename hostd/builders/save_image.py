"""libvirt's save image header, and the domain XML of a clone restored from it (no I/O).

A libvirt save file is a 92-byte header, `data_len` bytes of data (the domain XML, NUL, the
cookie, NUL, zero padding: libvirt leaves ~64 KiB so the XML can be edited in place) and then
QEMU's migration stream. libvirt restores a domain under the name and UUID in that XML and
refuses to change them through restoreFlags' dxml, so each clone gets a copy of the template's
file whose header carries the clone's own XML (docs/facts/warm-start.md).
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from hostd.builders.domain_xml import QEMU_NS, TT_NS

__all__ = ["HEADER", "MAGIC", "SaveHeader", "SaveImageError", "clone_xml", "parse_header"]

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16sIIIII56x")  # magic, version, data_len, was_running, compressed,
#                                         cookieOffset, 14 unused words


class SaveImageError(Exception):
    """The bytes are not a libvirt save image we can rewrite."""


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    xml: str
    cookie: bytes

    @property
    def stream_offset(self) -> int:
        """Where QEMU's migration stream starts in the file."""
        return HEADER.size + self.data_len

    def with_xml(self, xml: str) -> bytes:
        """Header and data (exactly stream_offset bytes) carrying xml instead of ours."""
        body = xml.encode() + b"\0"
        data = body + self.cookie + b"\0" if self.cookie else body
        if len(data) > self.data_len:
            raise SaveImageError(
                f"the clone's XML ({len(body)} bytes) does not fit the save header "
                f"({self.data_len} bytes)"
            )
        head = HEADER.pack(
            MAGIC,
            self.version,
            self.data_len,
            self.was_running,
            self.compressed,
            len(body) if self.cookie else 0,
        )
        return head + data + b"\0" * (self.data_len - len(data))


def parse_header(raw: bytes) -> SaveHeader:
    """Read the header from the first bytes of a save file (at least stream_offset of them)."""
    if len(raw) < HEADER.size:
        raise SaveImageError("too short for a libvirt save image")
    magic, version, data_len, running, compressed, cookie_at = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SaveImageError(f"not a finished libvirt save image (magic {magic!r})")
    if version != 2 or compressed != 0:
        raise SaveImageError(f"save image version {version}, compression {compressed}: unknown")
    data = raw[HEADER.size : HEADER.size + data_len]
    if len(data) < data_len:
        raise SaveImageError("the header's data is cut short")
    end = data.find(b"\0")
    if end < 0:
        raise SaveImageError("the header's XML is not terminated")
    cookie = b""
    if cookie_at:
        cookie = data[cookie_at : data.find(b"\0", cookie_at)]
    return SaveHeader(version, data_len, running, compressed, data[:end].decode(), cookie)


def _set(root: ET.Element, path: str, attr: str, value: str) -> None:
    for el in root.iterfind(path):
        el.set(attr, value)


def clone_xml(
    saved: str,
    *,
    name: str,
    uuid: str,
    metadata: dict[str, str],
    disk: Path,
    console_log: Path,
    agent_socket: Path,
    nic: tuple[str, str] | None,
    genid: str = "",
) -> str:
    """The saved domain XML made into a clone's: its name, UUID, metadata, disk, console log,
    agent socket, NIC (tap, MAC; an empty tap lets libvirt make an unconnected one) and VM
    generation ID (where the template has one: x86).

    The disk's <backingStore> goes, so libvirt re-reads the clone's own overlay chain. The
    kernel command line stays the template's: the guest's memory already booted with it.
    """
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace("tt", TT_NS)
    root = ET.fromstring(saved)  # noqa: S314 - libvirt's own XML of our own template
    for tag, text in (("name", name), ("uuid", uuid)):
        el = root.find(tag)
        if el is None:
            raise SaveImageError(f"saved XML has no <{tag}>")
        el.text = text
    _set_genid(root, genid)
    meta = root.find(f"metadata/{{{TT_NS}}}vm")
    if meta is not None:
        for child in list(meta):
            meta.remove(child)
        for key, value in sorted(metadata.items()):
            ET.SubElement(meta, f"{{{TT_NS}}}{key}").text = value
    for d in root.iterfind("devices/disk[@device='disk']"):
        for bs in d.findall("backingStore"):
            d.remove(bs)
    _set(root, "devices/disk[@device='disk']/source", "file", str(disk))
    _set(root, "devices/serial[@type='file']/source", "path", str(console_log))
    _set(root, "devices/console[@type='file']/source", "path", str(console_log))
    _set(root, "devices/channel[@type='unix']/source", "path", str(agent_socket))
    for iface in root.iterfind("devices/interface[@type='ethernet']"):
        if nic is None:
            raise SaveImageError("the template has a NIC: a clone needs one too")
        tap, mac = nic
        _set(iface, "mac", "address", mac)
        for t in iface.findall("target"):
            iface.remove(t)
        if tap:
            ET.SubElement(iface, "target", {"dev": tap, "managed": "no"})
    return ET.tostring(root, encoding="unicode")


def _set_genid(root: ET.Element, genid: str) -> None:
    """A clone's own VM generation ID, where the template has one (guests reseed on a change)."""
    gen = root.find("genid")
    if gen is not None:
        if not genid:
            raise SaveImageError("the template has a VM generation ID: a clone needs its own")
        gen.text = genid
