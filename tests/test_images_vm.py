"""Build every required image (cached) and boot each to an agent that reports the right arch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostd.builders.image_recipe import DEFAULT_TARGETS
from hostd.images.catalogue import Image, scan
from hostd.vm.direct_vm import boot
from hostd.vm.image_check import check_image
from tests.conftest import IMAGE_PATH
from ttci.model.arch import Arch

pytestmark = [pytest.mark.vm, pytest.mark.image]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("release", "arch"), DEFAULT_TARGETS, ids=[f"{r}-{a.value}" for r, a in DEFAULT_TARGETS]
)
def test_image_builds_and_boots_to_its_agent(
    release: str, arch: Arch, tmp_path: Path, default_images: dict[str, Image]
) -> None:
    image = default_images[f"qemu:{release}:{arch.value}"]
    m = image.manifest
    assert m.name == f"qemu:{release}:{arch.value}"
    assert any(p.startswith(("python3=", f"python3:{arch.value}=")) for p in m.packages)
    assert any(p.startswith(("git=", f"git:{arch.value}=")) for p in m.packages)
    result = check_image(image)
    assert result.machine == arch.row.uname
    assert result.ok


def test_guest_is_a_configured_debian_system(amd64_image: Image) -> None:
    with boot(amd64_image.manifest, amd64_image.path) as vm, vm.connect() as agent:
        script = (
            "set -e; . /etc/os-release; echo $VERSION_CODENAME; id -un ci; "
            "apt-get --version | head -1; git --version; python3 -c 'print(6*7)'; "
            "bash -c 'echo bash-$BASH_VERSINFO'; cat /proc/1/comm; hostname; "
            "test -w /tmp && echo tmp-ok"
        )
        status, out, err = agent.output(["sh", "-c", script])
    assert status.ok, err
    lines = out.decode().splitlines()
    assert lines[0] == "bookworm"
    assert lines[1] == "ci"
    assert lines[2].startswith("apt ")
    assert lines[3].startswith("git version")
    assert lines[4] == "42"
    assert lines[5] == "bash-5"
    assert lines[6] == "tt-init"
    assert lines[7] == "tt-guest"
    assert lines[8] == "tmp-ok"


def test_vm_killed_leaves_nothing(amd64_image: Image) -> None:
    with boot(amd64_image.manifest, amd64_image.path) as vm:
        work = vm.workdir
        pid = vm.proc.pid
        vm.connect().close()
    assert not work.exists()
    assert (
        not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    )


def test_catalogue_reports_partial_images_and_never_offers_them(
    tmp_path: Path, amd64_image: Image
) -> None:
    good = tmp_path / amd64_image.path.name
    good.mkdir()
    for f in ("manifest.json", "vmlinuz", "initrd.img"):
        (good / f).write_bytes((amd64_image.path / f).read_bytes())
    (good / "disk.qcow2").write_bytes(b"truncated")
    (tmp_path / "qemu_debian-12_arm64").mkdir()  # no manifest: a build that died
    (tmp_path / ".build-qemu_debian-13_amd64-1").mkdir()  # in progress: ignored silently
    images, broken = scan(tmp_path)
    assert images == []
    reasons = {b.path.name: b.reason for b in broken}
    assert "disk.qcow2 is 9 bytes" in reasons[good.name]
    assert "no manifest" in reasons["qemu_debian-12_arm64"]
    assert len(reasons) == 2


def test_image_dropped_in_appears_without_restart(tmp_path: Path, amd64_image: Image) -> None:
    env = {**os.environ, "TT_IMAGE_PATH": str(tmp_path)}
    before = subprocess.run(
        [BIN / "tt", "image", "list", "--local", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(before.stdout)["images"] == []
    subprocess.run(["cp", "-a", str(amd64_image.path), str(tmp_path)], check=True)
    after = subprocess.run(
        [BIN / "tt", "image", "list", "--local", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert [i["name"] for i in json.loads(after.stdout)["images"]] == ["qemu:debian-12:amd64"]


def test_unchanged_build_is_skipped(amd64_image: Image) -> None:
    r = subprocess.run(
        [
            BIN / "tt",
            "image",
            "build",
            "debian-12",
            "--arch",
            "amd64",
            "--image-path",
            str(IMAGE_PATH),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout


def test_check_cli_prints_arch_and_time(amd64_image: Image) -> None:
    r = subprocess.run(
        [
            BIN / "tt",
            "image",
            "check",
            "qemu:debian-12:amd64",
            "--json",
            "--image-path",
            str(IMAGE_PATH),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    [res] = json.loads(r.stdout)
    assert res["machine"] == "x86_64" and res["ok"]
    assert res["accel"] in ("kvm", "tcg")
    assert res["first_answer_s"] > 0


def test_systemd_profile_with_operator_package_and_file(tmp_path: Path) -> None:
    """The systemd profile boots systemd with the agent as an early service; --package and
    --add put the operator's extras (e.g. the gitlab-runner helper) into the image."""
    from hostd.builders.image_recipe import AddedFile, BuildSpec
    from hostd.images.build import build_image
    from tests.conftest import CACHE_DIR
    from ttci.model.naming import parse_release

    helper = tmp_path / "helper-src" / "gitlab-runner-helper"
    helper.parent.mkdir()
    helper.write_text("#!/bin/sh\necho helper works\n")
    helper.chmod(0o755)
    spec = BuildSpec(
        parse_release("debian-12"),
        Arch.AMD64,
        profile="systemd",
        packages=("jq",),
        adds=(AddedFile(helper, "/usr/local/bin/gitlab-runner-helper"),),
    )
    manifest, _ = build_image(spec, IMAGE_PATH, CACHE_DIR)
    assert manifest.name == "qemu:debian-12+systemd:amd64"
    assert any(p.startswith("jq") for p in manifest.packages)
    image = Image(manifest, IMAGE_PATH / spec.name.dirname)
    with boot(manifest, image.path) as vm, vm.connect(timeout=120) as agent:
        status, out, err = agent.output(
            [
                "sh",
                "-c",
                "cat /proc/1/comm; gitlab-runner-helper; echo '{\"a\":5}' | jq .a; "
                "systemctl is-active tt-agent.service",
            ]
        )
    assert status.ok, err
    assert out.decode().split() == ["systemd", "helper", "works", "5", "active"]


def test_prune_removes_only_unreferenced_cache_trees(tmp_path: Path, amd64_image: Image) -> None:
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    subprocess.run(["cp", "-a", str(amd64_image.path), str(images)], check=True)
    keys = amd64_image.manifest.cache_keys
    assert len(keys) == 2 and keys[0].startswith("kernel-") and keys[1].startswith("rootfs-")
    for name in (*keys, "rootfs-0000stale", "kernel-0000stale", "notes"):
        (cache / name).mkdir(parents=True)
        (cache / name / "f").write_text("x")
    r = subprocess.run(
        [BIN / "tt", "image", "prune", "--image-path", str(images), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "2 cache tree(s) removed" in r.stdout
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        [*keys, "notes"]
    )
