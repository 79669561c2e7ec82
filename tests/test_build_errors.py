"""Bad input and broken builds: clear messages that name the fix, and nothing left behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def tt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "tt", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["debian-99"], "unknown release 'debian-99'", "debian-12"),
        (["debian-12", "--arch", "sparc"], "unknown architecture 'sparc'", "--arch"),
        (["debian-12", "--size", "lots"], "size 'lots' does not parse", "4G"),
        (["debian-12", "--size", "100M"], "under 1 GiB", "--size"),
        (["debian-12", "--add", "/nonexistent/file:/opt/x"], "does not exist", "check the path"),
        (["debian-12", "--add", "bad"], "does not parse", "HOST_PATH:/ABSOLUTE"),
        (["debian-12", "--profile", "desktop"], "unknown profile", "systemd"),
        (["debian-12", "--package", "no spaces"], "not valid", "Debian names"),
        ([], "which release", "--arch"),
    ],
)
def test_bad_build_input_is_explained(
    args: list[str], message: str, hint: str, tmp_path: Path
) -> None:
    r = tt(
        "image",
        "build",
        *args,
        "--image-path",
        str(tmp_path / "img"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and hint in r.stderr
    assert not (tmp_path / "img").exists() or not any((tmp_path / "img").iterdir())


def test_unknown_image_lists_what_exists(tmp_path: Path) -> None:
    r = tt("image", "check", "centos", "--image-path", str(tmp_path))
    assert r.returncode == 2
    assert "no image matches 'centos'" in r.stderr and "tt image build" in r.stderr


def test_missing_tool_names_the_package(tmp_path: Path) -> None:
    r = tt(
        "image",
        "build",
        "debian-12",
        "--image-path",
        str(tmp_path / "img"),
        "--cache-dir",
        str(tmp_path / "cache"),
        env={"TT_TOOL_PATH": str(tmp_path)},
    )
    assert r.returncode == 1
    assert "mmdebstrap is not installed" in r.stderr
    assert "apt-get install mmdebstrap" in r.stderr


def test_full_disk_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M", "tt-test-small", str(small)], check=True
    )
    try:
        r = tt(
            "image",
            "build",
            "debian-12",
            "--image-path",
            str(small / "img"),
            "--cache-dir",
            str(small / "cache"),
        )
        assert r.returncode == 1
        assert "MiB free under" in r.stderr and "bigger disk" in r.stderr
        assert not any((small / "img").iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _binfmt_state() -> tuple[bool, dict[str, str]]:
    if not (BINFMT / "status").exists():
        return False, {}
    return True, {
        p.name: p.read_text().splitlines()[0]
        for p in BINFMT.iterdir()
        if p.name.startswith("qemu-")
    }


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


@pytest.mark.image
def test_build_killed_half_way_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM while mmdebstrap runs a foreign (arm64) rootfs: no partial image or cache tree,
    nothing mounted, binfmt_misc as it was."""
    before = _binfmt_state()
    img, cache = tmp_path / "img", tmp_path / "cache"
    proc = subprocess.Popen(
        [
            BIN / "tt",
            "image",
            "build",
            "debian-12",
            "--arch",
            "arm64",
            "--image-path",
            str(img),
            "--cache-dir",
            str(cache),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "[rootfs]" in line and ("extracting" in line or "installing" in line):
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    time.sleep(3)
    assert _binfmt_state() != before or before[1].get("qemu-aarch64") == "enabled"
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, "".join(seen[-10:]) + rest
    assert "interrupted; cleaned up" in rest
    assert [p.name for p in img.iterdir()] == []
    assert [p.name for p in cache.iterdir() if not p.name.startswith(("kernel-", ".lock"))] == []
    assert _mounts_under(tmp_path) == []
    assert _binfmt_state() == before
