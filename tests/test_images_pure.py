"""Pure parts of the image pipeline: manifests, module closure, cpio, build recipes, qemu argv."""

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hostd.builders import cpio
from hostd.builders.image_recipe import DEFAULT_TARGETS, AddedFile, BuildSpec
from hostd.builders.initrd_modules import load_order, module_name, parse_builtin, parse_modules_dep
from hostd.builders.qemu_argv import QemuSpec, qemu_argv
from ttci.model.arch import Arch
from ttci.model.errors import BadInput, ImageError
from ttci.model.manifest import FileEntry, Manifest, parse_dpkg_status
from ttci.model.naming import parse_release

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/lib/crc16.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/drivers/char/virtio_console.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
"""


def test_module_load_order_puts_dependencies_first() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    order = load_order(
        deps, set(), ("virtio_pci", "virtio_blk", "virtio_console", "ext4"), ("virtio_net",)
    )
    names = [module_name(p) for p in order]
    assert names.index("virtio_pci_modern_dev") < names.index("virtio_pci")
    assert names.index("jbd2") < names.index("ext4")
    assert names[-1] == "ext4"
    assert "virtio_net" not in names


def test_builtin_modules_need_no_file() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_builtin("kernel/drivers/s390/virtio/virtio_ccw.ko\n")
    assert load_order(deps, builtin, ("virtio_ccw",)) == []
    with pytest.raises(ImageError, match="no module virtio_ccw"):
        load_order(deps, set(), ("virtio_ccw",))


def test_cpio_is_read_by_the_real_cpio(tmp_path: Path) -> None:
    if not shutil.which("cpio"):
        pytest.fail("cpio is not installed: run `make deps`")
    data = cpio.newc(
        [
            cpio.directory("bin"),
            cpio.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
            cpio.file("odd", b"12345"),
        ]
    )
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    text = listing.stdout.decode()
    assert "bin/hello" in text and "odd" in text and "-rwxr-xr-x" in text
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/hello").stat().st_mode & stat.S_IXUSR
    assert (tmp_path / "odd").read_bytes() == b"12345"


def _manifest() -> Manifest:
    f = FileEntry("disk.qcow2", 10, "ab" * 32)
    return Manifest(
        name="qemu:debian-12:arm64",
        os="debian",
        release="debian-12",
        suite="bookworm",
        arch="arm64",
        profile="agent",
        kernel_version="6.1.0-1-cloud-arm64",
        kernel_cmdline="console=ttyAMA0 root=/dev/vda",
        kernel=f,
        initrd=f,
        disk=f,
        disk_virtual_size=4 << 30,
        built_at="2026-11-24T00:00:00+00:00",
        inputs_key="k",
        agent_protocol=1,
        packages=("bash=5.2",),
        extra_packages=("jq",),
    )


def test_manifest_round_trip() -> None:
    m = _manifest()
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.image_name.arch is Arch.ARM64


def test_manifest_errors_name_the_fix() -> None:
    d = _manifest().to_dict()
    del d["kernel"]
    with pytest.raises(ImageError, match="malformed") as e:
        Manifest.from_dict(d)
    assert e.value.hint == "rebuild the image"
    with pytest.raises(ImageError, match="version 9"):
        Manifest.from_dict({**_manifest().to_dict(), "version": 9})


def test_dpkg_status_lists_installed_packages_only() -> None:
    status = (
        "Package: bash\nStatus: install ok installed\nArchitecture: arm64\nVersion: 5.2\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: tzdata\nStatus: install ok installed\nArchitecture: all\nVersion: 2024a\n"
    )
    assert parse_dpkg_status(status) == ("bash:arm64=5.2", "tzdata=2024a")


def test_rootfs_argv_and_cache_keys() -> None:
    spec = BuildSpec(parse_release("debian-12"), Arch.ARM64, packages=("jq",))
    argv = spec.rootfs_argv(Path("/t"))
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--architectures=arm64"]
    include = next(a for a in argv if a.startswith("--include="))
    assert {"python3", "git", "jq", "busybox-static"} <= set(include[10:].split(","))
    assert argv[-3:] == ["bookworm", "/t", "http://deb.debian.org/debian"]
    other = BuildSpec(parse_release("debian-12"), Arch.ARM64)
    assert spec.rootfs_key() != other.rootfs_key()
    assert spec.kernel_key() == other.kernel_key()
    assert spec.inputs_key("a", "b") != spec.inputs_key("a2", "b")


def test_testing_suites_ignore_expired_release_files() -> None:
    spec = BuildSpec(parse_release("debian-14"), Arch.RISCV64)
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in spec.rootfs_argv(Path("/t"))
    assert spec.name.release == "debian-14"


def test_cmdline_per_arch_and_profile() -> None:
    i386 = BuildSpec(parse_release("debian-12"), Arch.I386)
    assert "console=ttyS0" in i386.kernel_cmdline() and "noisapnp" in i386.kernel_cmdline()
    sd = BuildSpec(parse_release("debian-12"), Arch.AMD64, profile="systemd")
    assert "tt.init=/lib/systemd/systemd" in sd.kernel_cmdline()
    assert "openssh-server" in sd.all_packages()


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"packages": ("bad name",)}, "not valid"),
        ({"disk_size": 1 << 20}, "under 1 GiB"),
        ({"profile": "gui"}, "unknown profile"),
    ],
)
def test_bad_build_input(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(BadInput, match=why):
        BuildSpec(parse_release("debian-12"), Arch.AMD64, **kwargs)  # type: ignore[arg-type]


def test_added_file_parsing() -> None:
    a = AddedFile.parse("/opt/gitlab-runner-helper:/usr/local/bin/gitlab-runner-helper")
    assert a.src == Path("/opt/gitlab-runner-helper")
    assert a.dest == "/usr/local/bin/gitlab-runner-helper"
    for bad in ("nocolon", "/src:relative/dest", "/src:/../etc/passwd"):
        with pytest.raises(BadInput):
            AddedFile.parse(bad)


def test_default_targets_cover_the_nine_required_images() -> None:
    names = {f"{r}:{a.value}" for r, a in DEFAULT_TARGETS}
    assert len(names) == 9
    assert {
        f"debian-12:{a}" for a in ("amd64", "arm64", "i386", "armhf", "ppc64el", "s390x")
    } <= names
    assert {"debian-13:amd64", "debian-13:arm64"} <= names
    assert any(n.endswith(":riscv64") for n in names)


@pytest.mark.parametrize("arch", list(Arch))
def test_qemu_argv_per_arch(arch: Arch) -> None:
    spec = QemuSpec(
        arch=arch,
        kernel=Path("/k"),
        initrd=Path("/i"),
        disk=Path("/d.qcow2"),
        cmdline="console=x",
        agent_socket=Path("/s.sock"),
        console_log=Path("/c"),
    )
    argv = qemu_argv(spec)
    assert argv[0] == arch.row.qemu_binary
    joined = " ".join(argv)
    assert f"-machine {arch.row.qemu_machine}" in joined
    assert f"{arch.virtio_device('serial')}" in joined
    assert "name=org.ttci.agent.0" in joined
    assert "-accel tcg" in joined and "-net none" in joined
    if arch is Arch.RISCV64:
        assert "-bios default" in joined


def test_qemu_argv_kvm_and_ssh_forward_are_restricted() -> None:
    spec = QemuSpec(
        arch=Arch.AMD64,
        kernel=Path("/k"),
        initrd=Path("/i"),
        disk=Path("/d"),
        cmdline="",
        agent_socket=Path("/s"),
        console_log=Path("/c"),
        accel="kvm",
        ssh_forward_port=2222,
    )
    joined = " ".join(qemu_argv(spec))
    assert "-accel kvm -cpu host" in joined
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22" in joined
