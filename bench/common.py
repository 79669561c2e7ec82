"""Shared bits of the benchmarks: tables, JSON output, ssh helpers, statistics."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hostd.builders.image_recipe import AddedFile, BuildSpec
from hostd.images.build import build_image
from hostd.images.catalogue import Image
from hostd.vm.accel import choose_accel
from ttci.infra.proc import run
from ttci.model.naming import parse_arch, parse_release

console = Console(width=160)
SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=2",
]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_key(cache_dir: Path) -> Path:
    """A stable ssh key for benchmark images (stable so the image is not rebuilt every run)."""
    key = cache_dir / "bench-ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    return key


def ssh_argv(key: Path, port: int, *extra: str) -> list[str]:
    return ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), *extra, "root@127.0.0.1"]


def wait_ssh(key: Path, port: int, timeout: float = 120) -> float:
    """Seconds until `ssh true` first succeeds (the way GitLab's libvirt example waits)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = subprocess.run(
            [*ssh_argv(key, port), "true"], capture_output=True, timeout=30, check=False
        )
        if r.returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"ssh to port {port} did not answer within {timeout} s")


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def write_json(path: Path | None, data: object) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        console.print(f"wrote {path}")


def ssh_image(image_path: Path, cache_dir: Path) -> tuple[Image, Path, str]:
    """The ssh baseline's image: debian-12 amd64 with the systemd profile, sshd and our key.

    Returns:
        The image, the private key and the accelerator to boot it with.
    """
    key = bench_key(cache_dir)
    spec = BuildSpec(
        parse_release("debian-12"),
        parse_arch("amd64"),
        profile="systemd",
        adds=(AddedFile(key.with_suffix(".pub"), "/root/.ssh/authorized_keys"),),
    )
    manifest, _ = build_image(spec, image_path, cache_dir)
    image = Image(manifest, image_path / spec.name.dirname)
    return image, key, choose_accel(image)[0]
