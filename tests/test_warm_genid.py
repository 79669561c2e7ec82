"""VM generation IDs for real: x86 VMs have QEMU's vmgenid device (libvirt's <genid>), and every
clone of one template gets its own ID, so a guest kernel with the vmgenid driver reseeds its RNG
when it wakes as a clone. i386's Debian 12 kernel has the driver built in (the cloud amd64
kernel of Debian 12 lacks it; Debian 13's has it), so the test uses i386: the guest's ACPI
device QEMUVGID is bound to the vmgenid driver. The IDs are read where they live: libvirt's
domain XML and QEMU's own answer to QMP `query-vm-generation-id` (the guest kernel keeps the ID
to itself: no sysfs file shows it, and /dev/mem refuses its page)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from hostd.builders.save_image import parse_header
from hostd.images.catalogue import Image
from hostd.vm.accel import choose_accel
from hostd.vm.engine import Engine
from hostd.vm.libvirtd import PrivateLibvirtd, become_subreaper
from hostd.vm.manager import HostConfig, VMManager
from hostd.vm.warm import SAVE_FILE, TemplateSpec
from tests.cloudutil import leftovers
from tests.conftest import IMAGE_PATH, built_image
from ttci.model.resources import Resources
from ttci.wire.envs import VMRequest

pytestmark = [pytest.mark.vm]
MEM = 384


@pytest.fixture(scope="module")
def i386() -> Image:
    return built_image("debian-12", "i386")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, i386: Image) -> Iterator[VMManager]:
    become_subreaper()
    state = tmp_path_factory.mktemp("genid")
    libvirtd = PrivateLibvirtd(state / "libvirt")
    libvirtd.start()
    mgr = VMManager(
        HostConfig("genidt", IMAGE_PATH, state / "hostd", Resources(4, 4096, 100)),
        Engine(libvirtd.uri),
    )
    try:
        yield mgr
    finally:
        mgr.shutdown(keep_vms=False)
        libvirtd.stop()
    assert [f for f in leftovers(state) if not f.startswith("cgroup ") or "-tt-genidt-" in f] == []


def _ids(conn: libvirt.virConnect, domain: str) -> tuple[str, str]:
    """(libvirt's <genid>, QEMU's vmgenid guid) of a running domain."""
    dom = conn.lookupByName(domain)
    xml = dom.XMLDesc()
    in_xml = xml.split("<genid>", 1)[1].split("</genid>", 1)[0] if "<genid>" in xml else ""
    answer = libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-vm-generation-id"}', 0)
    return in_xml, str(json.loads(answer)["return"]["guid"])


def test_each_clone_has_its_own_generation_id(host: VMManager, i386: Image) -> None:
    accel, _ = choose_accel(i386)
    spec = TemplateSpec(i386, 1, MEM, i386.manifest.disk_virtual_size >> 30, accel)
    tpl = host.templates.make(spec)
    with open(Path(tpl["dir"]) / SAVE_FILE, "rb") as f:
        saved = parse_header(f.read(1 << 20)).xml
    template_id = saved.split("<genid>", 1)[1].split("</genid>", 1)[0]
    conn = libvirt.open(host.engine.uri)
    try:
        ids = []
        for n in range(2):
            row = host.create(
                VMRequest(f"g{n}", "genid", f"g{n}", "tester", i386.name, memory_mib=MEM)
            )
            assert row["start"] == "warm", row
            in_xml, in_qemu = _ids(conn, str(row["domain"]))
            assert in_xml == in_qemu  # QEMU's device carries the ID libvirt shows
            ids.append(in_qemu)
            st, out, _ = host.agent(f"g{n}").output(
                ["sh", "-c", "ls /sys/bus/acpi/devices/; ls /sys/bus/acpi/drivers/vmgenid/"]
            )
            assert st.ok and out.decode().count("QEMUVGID:00") == 2, out  # device, and driver bound
        assert len({*ids, template_id}) == 3, (ids, template_id)
    finally:
        conn.close()
        for n in range(2):
            host.delete(f"g{n}")
