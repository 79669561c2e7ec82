"""Snapshot templates, mechanically: boot and save one, restore clones of it, wake a clone up.

A template is a VM booted once to a ready agent, idle, then saved by libvirt (memory and device
state in `vm.save`) with its disk frozen read-only (`disk.qcow2`: a qcow2 overlay, or a link into
a ZFS dataset; hostd/storage). A clone gets its own copy-on-write disk on that frozen one (the
caller's `make_disk`) and its own copy of the save file whose header carries the clone's
domain XML (name, UUID, disk, console log, agent socket, tap, MAC); libvirt restores it into
its own cgroup. The restored guest still has the template's identity until `wake` gives it its
own (ttci.wire.agent_protocol, IDENTITY). Policy (which template, when, fallbacks) lives in
hostd.vm.templates; this module only does the steps.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hostd.builders.domain_xml import DomainSpec
from hostd.builders.save_image import SaveHeader, SaveImageError, clone_xml, parse_header
from hostd.images.catalogue import Image
from hostd.vm.agent_client import AgentClient
from hostd.vm.engine import Engine
from ttci.model.arch import Arch
from ttci.model.errors import AgentError, BootError, TTError
from ttci.wire.agent_protocol import identity_payload

log = logging.getLogger("hostd.vm.warm")

__all__ = [
    "DISK_FILE",
    "SAVE_FILE",
    "TEMPLATE_MAC",
    "CloneSpec",
    "TemplateError",
    "TemplateSpec",
    "WakeError",
    "claim_spare",
    "copy_save",
    "dns_servers",
    "identity_for",
    "make_spare",
    "make_template",
    "read_header",
    "restore_clone",
    "spares",
    "vcpus_for",
    "wake",
]

SAVE_FILE = "vm.save"
DISK_FILE = "disk.qcow2"
TEMPLATE_MAC = "52:54:00:00:7e:01"  # the template's NIC: never on a bridge, every clone's differs
SETTLE_S = 1.0  # let the guest finish what boot started before it is frozen
_HEAD_READ = 1 << 20
# Restores at once: more than one per core only makes each slower (QEMU's start and the load of
# the memory state are CPU work; measured with 4 clones on 2 cores).
_RESTORES = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


class TemplateError(TTError):
    """A template could not be made, or a clone could not be restored from it."""


class WakeError(TemplateError):
    """A restored clone never answered: QEMU restored it, but the guest does not run on."""


@dataclass(frozen=True)
class CloneSpec:
    """A VM restored from a template: its own domain name, UUID, work directory (disk, console
    log, agent socket), NIC (tap or "" for an unconnected one, MAC) and metadata."""

    name: str
    uuid: str
    directory: Path
    nic: tuple[str, str]
    metadata: dict[str, str]
    genid: str = field(default_factory=lambda: str(uuid.uuid4()))  # its VM generation ID

    @property
    def disk(self) -> Path:
        return self.directory / DISK_FILE

    @property
    def agent_socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"


@dataclass(frozen=True)
class TemplateSpec:
    """What one template is: the image booted at one size with one accelerator."""

    image: Image
    vcpus: int
    memory_mib: int
    disk_gib: int
    accel: str

    def domain(
        self, name: str, directory: Path, token: str, metadata: dict[str, str]
    ) -> DomainSpec:
        m = self.image.manifest
        cmdline = f"{m.kernel_cmdline} tt.hostname=tt-template tt.template=1"  # token: HELLO
        if self.disk_gib << 30 > m.disk_virtual_size:
            cmdline += " tt.resize=1"
        return DomainSpec(
            name=name,
            uuid=str(uuid.uuid4()),
            arch=Arch.parse(m.arch),
            kernel=self.image.file(m.kernel.path),
            initrd=self.image.file(m.initrd.path),
            cmdline=cmdline + " net.ifnames=0",  # no tt.ip: a clone's NIC is set by IDENTITY
            disk=directory / DISK_FILE,
            agent_socket=directory / "agent.sock",
            console_log=directory / "console.log",
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            accel=self.accel,
            nic=("", TEMPLATE_MAC),
            metadata=metadata,
        )


def make_template(
    engine: Engine,
    spec: TemplateSpec,
    directory: Path,
    *,
    name: str,
    token: str,
    meta: dict[str, str],
    alive: Callable[[], bool] | None = None,
    make_disk: Callable[[Path], object],
    freeze: Callable[[], None],
) -> float:
    """Boot, wait for the agent, let it settle, save, freeze. Returns the boot seconds.

    make_disk(path) makes the template's disk at path (a clone of its image's); freeze() makes
    it read-only once saved. The caller recorded directory and name first and removes them if
    this raises.

    Raises:
        TemplateError: the agent cannot take an identity (an old image), or a step failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    make_disk(directory / DISK_FILE)
    dom = spec.domain(name, directory, token, meta)
    t0 = time.monotonic()
    engine.start(dom)
    try:
        # Long slices: a booting guest is not reconnected to every few seconds.
        agent = _reach(dom.agent_socket, token, time.monotonic() + 120, alive, slice_s=10.0)
    except (BootError, AgentError) as e:
        raise TemplateError(f"template of {spec.image.name} did not boot: {e}") from e
    boot_s = time.monotonic() - t0
    try:
        if not agent.knows_identity:
            raise TemplateError(
                f"{spec.image.name}'s agent predates warm start",
                hint=f"rebuild it: tt image build --force {spec.image.manifest.release}",
            )
        agent.exec(["sync"], timeout=30)
        time.sleep(SETTLE_S)
    finally:
        agent.close()
    time.sleep(0.1)  # the agent sees its host leave before it is frozen
    engine.save(name, directory / SAVE_FILE)
    engine.destroy(name)  # saved: only the definition is left
    freeze()
    dom.agent_socket.unlink(missing_ok=True)
    read_header(directory / SAVE_FILE)  # a template we could not clone is no template
    return boot_s


def read_header(save: Path) -> SaveHeader:
    try:
        with open(save, "rb") as f:
            return parse_header(f.read(_HEAD_READ))
    except (OSError, SaveImageError) as e:
        raise TemplateError(f"template save file {save}: {e}") from e


def copy_save(template_save: Path, header: SaveHeader, xml: str, dest: Path) -> None:
    """dest: the template's save file with xml in its header (the memory is copied in-kernel)."""
    head = _head(header, xml)
    with open(template_save, "rb") as src, open(dest, "wb") as dst:
        dst.write(head)
        _send(src, dst, header.stream_offset, template_save)


def _head(header: SaveHeader, xml: str) -> bytes:
    try:
        return header.with_xml(xml)
    except SaveImageError as e:
        raise TemplateError(str(e)) from e


def _send(src: BinaryIO, dst: BinaryIO, offset: int, what: Path) -> None:
    """src from offset on to dst's position, in-kernel."""
    size = os.fstat(src.fileno()).st_size
    while offset < size:
        n = os.sendfile(dst.fileno(), src.fileno(), offset, size - offset)
        if n == 0:
            raise TemplateError(f"{what} shrank while it was copied")
        offset += n


def make_spare(template_dir: Path) -> Path:
    """One more whole copy of the template's save file (`spare-*.save`, written as `.part` and
    renamed when complete), so a clone's restore need not wait for its copy: it takes a spare
    and rewrites only the header (`claim_spare`)."""
    part = template_dir / f"spare-{uuid.uuid4().hex[:12]}.part"
    try:
        with open(template_dir / SAVE_FILE, "rb") as src, open(part, "wb") as dst:
            _send(src, dst, 0, template_dir / SAVE_FILE)
        return part.rename(part.with_suffix(".save"))
    finally:
        part.unlink(missing_ok=True)


def spares(template_dir: Path) -> list[Path]:
    return sorted(template_dir.glob("spare-*.save"))


def claim_spare(template_dir: Path, header: SaveHeader, xml: str, dest: Path) -> bool:
    """Move a spare copy of the template's save file to dest (an atomic rename: each spare goes
    to one clone) and write xml into its header; False when no spare is left."""
    head = _head(header, xml)
    for spare in spares(template_dir):
        try:
            spare.rename(dest)
        except OSError:  # another clone took it (or another filesystem: copy instead)
            continue
        with open(dest, "r+b") as f:
            f.write(head)
        return True
    return False


def restore_clone(  # noqa: PLR0917 - the template, the clone, and how its disk is made
    engine: Engine,
    template_dir: Path,
    header: SaveHeader,
    dom: CloneSpec,
    make_disk: Callable[[Path, int], object],
    disk_gib: int,
) -> None:
    """Start the clone dom from the template's state.

    make_disk(dom.disk, disk_gib) makes its disk (a clone of the template's frozen one, grown to
    disk_gib); a save file copy is made next to it and removed once QEMU has read it.

    Raises:
        TemplateError, EngineError: the clone did not start (nothing of it runs).
    """
    t0 = time.monotonic()
    make_disk(dom.disk, disk_gib)
    t1 = time.monotonic()
    xml = clone_xml(
        header.xml,
        name=dom.name,
        uuid=dom.uuid,
        metadata=dom.metadata,
        disk=dom.disk,
        console_log=dom.console_log,
        agent_socket=dom.agent_socket,
        nic=dom.nic,
        genid=dom.genid,
    )
    save = dom.directory / SAVE_FILE
    if not claim_spare(template_dir, header, xml, save):
        copy_save(template_dir / SAVE_FILE, header, xml, save)
    t2 = time.monotonic()
    try:
        with _RESTORES:
            engine.restore(save)
    finally:
        save.unlink(missing_ok=True)
    log.debug(
        "%s restored: disk %.3f s, save copy %.3f s, restore %.3f s",
        dom.name,
        t1 - t0,
        t2 - t1,
        time.monotonic() - t2,
    )


def identity_for(hostname: str, token: str, net: dict[str, Any] | None) -> dict[str, Any]:
    """A clone's identity: its name and token, a new machine-id, fresh entropy, the host's time."""
    return identity_payload(
        token=token,
        hostname=hostname,
        machine_id=uuid.uuid4().hex,
        seed=secrets.token_hex(64),
        time=time.time(),
        net=net,
    )


def vcpus_for(cpus: float) -> int:
    """The vCPUs a VM of `cpus` CPUs gets (its cgroup quota holds it to the fraction)."""
    return max(1, int(cpus + 0.999))


def dns_servers(cmdline: str) -> list[str] | None:
    """The DNS servers a cold boot gets (`tt.dns=A,B` on its kernel command line), else None."""
    for word in cmdline.split():
        if word.startswith("tt.dns="):
            return [s for s in word.removeprefix("tt.dns=").split(",") if s]
    return None


def wake(  # noqa: PLR0917 - the clone's socket and credentials, and two callbacks
    sock: Path,
    template_token: str,
    identity: dict[str, Any],
    timeout: float,
    alive: Callable[[], bool] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> AgentClient:
    """Reach a restored clone's agent with the template's token, give it its identity, and open
    a session with its own token (the template's opens nothing after this). alive: whether the
    clone still runs (checked every few seconds, so a dead restore fails at once). meanwhile:
    run alongside (the clone's cgroup limits: libvirt may queue them behind other restores).

    Raises:
        TemplateError: no answer, or the identity was refused; meanwhile's own errors.
    """
    errors: list[Exception] = []

    def side() -> None:
        try:
            if meanwhile is not None:
                meanwhile()
        except Exception as e:  # re-raised below, in the caller's thread
            errors.append(e)

    helper = threading.Thread(target=side, name="wake-side", daemon=True)
    helper.start()
    try:
        agent = _wake(sock, template_token, identity, time.monotonic() + timeout, alive)
    finally:
        helper.join()
    if errors:
        agent.close()
        raise errors[0]
    return agent


def _wake(
    sock: Path,
    template_token: str,
    identity: dict[str, Any],
    deadline: float,
    alive: Callable[[], bool] | None,
) -> AgentClient:
    try:
        first = _reach(sock, template_token, deadline, alive)
        try:
            t0 = time.monotonic()
            # The clock is set from the time sent: take it now, not when the payload was made.
            identity = {**identity, "time": time.time()}
            done = first.identity(identity, timeout=max(1.0, deadline - time.monotonic()))
            log.debug("identity applied in %.3f s: %s", time.monotonic() - t0, done)
        finally:
            first.close()
        return AgentClient.connect(
            sock, token=identity["token"], timeout=max(2.0, deadline - time.monotonic())
        )
    except (BootError, AgentError) as e:
        raise WakeError(f"the restored VM did not wake: {e}") from e


def _reach(
    sock: Path,
    token: str,
    deadline: float,
    alive: Callable[[], bool] | None,
    slice_s: float = 3.0,
) -> AgentClient:
    """Connect and HELLO in slices, giving up early when alive() says the VM is gone."""
    started = time.monotonic()
    while True:
        left = deadline - time.monotonic()
        try:
            return AgentClient.connect(sock, token=token, timeout=max(0.1, min(slice_s, left)))
        except BootError as e:
            if left <= slice_s:
                waited = time.monotonic() - started
                raise BootError(f"no answer in {waited:.0f} s ({e.message})") from None
            if alive is not None and not alive():
                raise BootError("the VM stopped, or hostd is stopping") from None
