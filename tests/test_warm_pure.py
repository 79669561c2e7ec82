"""Warm start without VMs: the IDENTITY message pinned in bytes, libvirt's save header and the
clone's domain XML, template keys, the metrics and the CLI's size words."""

from __future__ import annotations

import dataclasses
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from hostd.builders.domain_xml import TT_NS, DomainSpec, domain_xml
from hostd.builders.save_image import HEADER, MAGIC, SaveImageError, clone_xml, parse_header
from hostd.cli.image_cmd import parse_vm_size
from hostd.images.catalogue import Image
from hostd.service.metrics import HostMetrics
from hostd.vm.spares import Spares, reap_parts
from hostd.vm.templates import template_key
from hostd.vm.warm import SAVE_FILE, TemplateSpec, claim_spare, dns_servers, spares
from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.manifest import FileEntry, Manifest
from ttci.wire.agent_protocol import (
    IDENTITY_FEATURE,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode_json,
    identity_payload,
    parse_identity,
)

TOKEN = "ab" * 16
MID = "0123456789abcdef" * 2


def _identity(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "token": TOKEN,
        "hostname": "vm-1",
        "machine_id": MID,
        "seed": "00ff" * 8,
        "time": 1700000000.5,
        "net": {"mac": "52:54:00:12:34:56", "ip": "10.0.0.2/24", "gateway": None, "dns": None},
    }
    base.update(over)
    return base


def test_identity_frame_fixed_bytes() -> None:
    payload = identity_payload(**_identity(net=None))  # type: ignore[arg-type]
    frame = encode_json(MsgType.IDENTITY, 5, payload)
    body = (
        b'{"hostname":"vm-1","machine_id":"'
        + MID.encode()
        + b'","seed":"'
        + b"00ff" * 8
        + b'","time":1700000000.5,"token":"'
        + TOKEN.encode()
        + b'","v":1}'
    )
    assert frame == b"TT\x01\x0d\x00\x00\x00\x05" + len(body).to_bytes(4, "big") + body
    assert Decoder().feed(frame) == [Frame(MsgType.IDENTITY, 5, body)]
    assert encode_json(MsgType.IDENTITY_OK, 5, {"v": 1})[:4] == b"TT\x01\x0e"
    assert IDENTITY_FEATURE == "identity/1"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"v": 2}, "identity version 2"),
        ({"token": "NOT HEX"}, "token is not lowercase hex"),
        ({"machine_id": "abc"}, "machine_id is not 32"),
        ({"hostname": "-bad"}, "not a host name"),
        ({"time": "now"}, "time is not a number"),
        ({"net": {"mac": "52:54:00:12:34:56", "ip": "10.0.0.2/24 dev lo"}}, "ip"),
        ({"net": {"mac": "x; reboot"}}, "with a mac"),
        ({"net": {"mac": "52:54:00:12:34:56", "dns": ["1.1.1.1", "a b"]}}, "dns"),
    ],
)
def test_bad_identities_are_refused_without_echoing_tokens(
    over: dict[str, object], message: str
) -> None:
    d = {"v": 1, **_identity(), **over}
    with pytest.raises(ProtocolError, match=message) as e:
        parse_identity(d)
    assert TOKEN not in str(e.value)


SAVED = f"""<domain type='qemu'>
  <name>tt-h-tpl-1</name>
  <uuid>11111111-1111-1111-1111-111111111111</uuid>
  <metadata xmlns:tt="{TT_NS}">
    <tt:vm><tt:host>h</tt:host><tt:vm>template-1</tt:vm></tt:vm></metadata>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><cmdline>quiet tt.token=T</cmdline></os>
  <devices>
    <disk type='file' device='disk'><source file='/t/disk.qcow2'/>
      <backingStore type='file'><source file='/img/disk.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <interface type='ethernet'><mac address='52:54:00:00:7e:01'/><model type='virtio'/></interface>
    <serial type='file'><source path='/t/console.log'/></serial>
    <console type='file'><source path='/t/console.log'/></console>
    <channel type='unix'><source mode='bind' path='/t/agent.sock'/></channel>
  </devices>
</domain>"""


def _save_bytes(xml: str, pad: int = 4096) -> bytes:
    cookie = b"<cookie/>\n"
    data = xml.encode() + b"\0" + cookie + b"\0"
    data_len = len(data) + pad
    head = HEADER.pack(MAGIC, 2, data_len, 1, 0, len(xml) + 1)
    return head + data + b"\0" * pad + b"QEVM-stream"


def test_save_header_round_trip_and_room() -> None:
    raw = _save_bytes(SAVED)
    h = parse_header(raw)
    assert (h.xml, h.cookie, h.was_running) == (SAVED, b"<cookie/>\n", 1)
    assert raw[h.stream_offset :] == b"QEVM-stream"
    new = h.with_xml(SAVED.replace("tpl-1", "vm-22"))
    assert len(new) == h.stream_offset  # the stream stays where QEMU looks for it
    again = parse_header(new + b"QEVM-stream")
    assert "tt-h-vm-22" in again.xml and again.cookie == h.cookie
    with pytest.raises(SaveImageError, match="does not fit"):
        h.with_xml("x" * (h.data_len + 1))
    with pytest.raises(SaveImageError, match="not a finished"):
        parse_header(b"LibvirtQemudPart" + raw[16:])


def test_clone_xml_is_the_clones_own() -> None:
    xml = clone_xml(
        SAVED,
        name="tt-h-vm9",
        uuid="22222222-2222-2222-2222-222222222222",
        metadata={"host": "h", "vm": "vm9", "env": "e"},
        disk=Path("/w/disk.qcow2"),
        console_log=Path("/w/console.log"),
        agent_socket=Path("/w/agent.sock"),
        nic=("ttt123", "52:54:00:aa:bb:cc"),
    )
    root = ET.fromstring(xml)  # noqa: S314 - our own test string
    assert root.findtext("name") == "tt-h-vm9"
    assert root.findtext("uuid") == "22222222-2222-2222-2222-222222222222"
    meta = root.find(f"metadata/{{{TT_NS}}}vm")
    assert meta is not None
    assert {c.tag.split("}")[1]: c.text for c in meta} == {"host": "h", "vm": "vm9", "env": "e"}
    disk = root.find("devices/disk")
    assert disk is not None and disk.find("backingStore") is None
    assert root.find("devices/disk/source").get("file") == "/w/disk.qcow2"  # type: ignore[union-attr]
    paths = {el.get("path") for el in root.iterfind("devices/*/source") if el.get("path")}
    assert paths == {"/w/console.log", "/w/agent.sock"}
    iface = root.find("devices/interface")
    assert iface is not None
    assert iface.find("mac").get("address") == "52:54:00:aa:bb:cc"  # type: ignore[union-attr]
    assert iface.find("target").attrib == {"dev": "ttt123", "managed": "no"}  # type: ignore[union-attr]
    assert root.findtext("os/cmdline") == "quiet tt.token=T"  # memory booted with it: kept
    with pytest.raises(SaveImageError, match="needs one too"):
        clone_xml(SAVED, name="n", uuid="u", metadata={}, disk=Path("/d"),
                  console_log=Path("/c"), agent_socket=Path("/a"), nic=None)  # fmt: skip


def _image(built_at: str = "2026-01-01T00:00:00+00:00") -> Image:
    f = FileEntry("x", 1, "00" * 32)
    m = Manifest(
        name="qemu:debian-12:amd64",
        os="debian",
        release="debian-12",
        suite="bookworm",
        arch="amd64",
        profile="agent",
        kernel_version="6.1",
        kernel_cmdline="quiet",
        kernel=f,
        initrd=f,
        disk=f,
        disk_virtual_size=4 << 30,
        built_at=built_at,
        inputs_key="k",
        agent_protocol=1,
        packages=(),
    )
    return Image(m, Path("/img"))


def test_template_key_changes_with_everything_its_memory_depends_on() -> None:
    spec = TemplateSpec(_image(), 1, 512, 4, "tcg")
    key = template_key(spec, 7002022)
    assert template_key(TemplateSpec(_image(), 1, 512, 4, "tcg"), 7002022) == key
    others = [
        template_key(spec, 8000000),
        template_key(dataclasses.replace(spec, memory_mib=1024), 7002022),
        template_key(dataclasses.replace(spec, vcpus=2), 7002022),
        template_key(dataclasses.replace(spec, disk_gib=8), 7002022),
        template_key(dataclasses.replace(spec, accel="kvm"), 7002022),
        template_key(dataclasses.replace(spec, image=_image("2027-01-01T00:00:00+00:00")), 7002022),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_dns_servers_follow_the_cold_command_line() -> None:
    assert dns_servers("quiet tt.ip=10.0.0.2/24 tt.dns=10.0.0.1,10.0.0.9") == [
        "10.0.0.1",
        "10.0.0.9",
    ]
    assert dns_servers("quiet tt.ip=10.0.0.2/24") is None


def test_metrics_show_templates_hits_misses_and_selftests() -> None:
    warm = {
        "templates": [{"state": "ready"}, {"state": "building"}],
        "bytes": 123,
        "hits": 4,
        "misses": {"no_template": 2, "selftest_failed": 1},
        "selftests": [
            {"arch": "amd64", "qemu": "7.2.22", "accel": "tcg", "ok": True},
            {"arch": "ppc64el", "qemu": "7.2.22", "accel": "tcg", "ok": False},
        ],
    }
    snap = {"vms": {}, "total": {}, "used": {}, "warm": warm}
    text = HostMetrics(lambda: snap).exposition().decode()
    for line in (
        'ttci_hostd_templates{state="ready"} 1.0',
        "ttci_hostd_template_bytes 123.0",
        'ttci_hostd_warm_starts_total{kind="warm"} 4.0',
        'ttci_hostd_warm_starts_total{kind="cold"} 3.0',
        'ttci_hostd_warm_misses_total{reason="selftest_failed"} 1.0',
        'ttci_hostd_restore_selftest{accel="tcg",arch="ppc64el",qemu="7.2.22"} 0.0',
    ):
        assert line in text, line


def test_vm_size_words() -> None:
    assert parse_vm_size("1x512") == (1.0, 512, 0)
    assert parse_vm_size("2X1024x8") == (2.0, 1024, 8)
    with pytest.raises(BadInput, match="does not parse"):
        parse_vm_size("big")


def test_x86_vms_have_a_generation_id_and_each_clone_its_own() -> None:
    def spec(arch: str) -> DomainSpec:
        p = Path("/x")
        return DomainSpec("n", "u", Arch.parse(arch), p, p, "", p, p, p, 512, 1)

    for arch, has in (("amd64", True), ("i386", True), ("arm64", False), ("s390x", False)):
        root = ET.fromstring(domain_xml(spec(arch)))  # noqa: S314 - our own XML
        assert (root.find("genid") is not None) is has, arch
    saved = SAVED.replace(
        "</uuid>", "</uuid>\n  <genid>33333333-3333-3333-3333-333333333333</genid>"
    )
    kw: dict[str, Any] = dict(name="n", uuid="u", metadata={}, disk=Path("/d"))
    kw |= dict(console_log=Path("/c"), agent_socket=Path("/a"), nic=("", "52:54:00:00:00:01"))
    ids = {ET.fromstring(clone_xml(saved, **kw, genid=g)).findtext("genid") for g in ("g1", "g2")}  # noqa: S314
    assert ids == {"g1", "g2"}
    with pytest.raises(SaveImageError, match="needs its own"):
        clone_xml(saved, **kw)
    assert ET.fromstring(clone_xml(SAVED, **kw)).find("genid") is None  # noqa: S314 - arm64 etc.


def test_spare_copies_are_taken_once_each_and_get_the_clones_header(tmp_path: Path) -> None:
    tpl, vms = tmp_path / "tpl", tmp_path / "vms"
    tpl.mkdir()
    vms.mkdir()
    raw = _save_bytes(SAVED) + os.urandom(1 << 20)  # a stream of 1 MiB
    (tpl / SAVE_FILE).write_bytes(raw)
    header = parse_header(raw)
    pool = Spares(keep=2)
    pool.want(tpl)
    deadline = time.monotonic() + 30
    while len(spares(tpl)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(spares(tpl)) == 2 and pool.disk_bytes([tpl]) == 2 * len(raw)
    got = []
    for n in range(3):  # two take a spare; the third finds none (and copies instead)
        dest = vms / f"vm{n}.save"
        got.append(claim_spare(tpl, header, SAVED.replace("tpl-1", f"vm-{n}"), dest))
        if got[-1]:
            data = dest.read_bytes()
            assert f"tt-h-vm-{n}" in parse_header(data).xml
            assert data[header.stream_offset :] == raw[header.stream_offset :]
    assert got == [True, True, False] and spares(tpl) == []
    (tpl / "spare-dead.part").write_bytes(b"half")  # a killed hostd's
    assert reap_parts(tmp_path) == 1 and not (tpl / "spare-dead.part").exists()
    pool.stop()
