"""An ENV whose creation fails half-way (one VM boots, the other cannot start) is taken back
whole: no ENV, no VM, no domain, no overlay left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cloudutil import configure_client, free_port, leftovers, qemu_pids, tt
from tests.conftest import built_image
from ttci.cli.allinone import running

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def test_half_failed_env_is_taken_back_whole(tmp_path: Path) -> None:
    good = built_image("debian-12", "amd64")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copytree(good.path, images / good.path.name)
    # A second image whose kernel is garbage of the right size: the catalogue offers it, QEMU
    # refuses to start it.
    bad = images / "qemu_debian-13_amd64"
    shutil.copytree(good.path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest.update(name="qemu:debian-13:amd64", release="debian-13", suite="trixie")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    kernel = bad / "vmlinuz"
    size = kernel.stat().st_size
    kernel.chmod(0o644)
    kernel.write_bytes(b"\0" * size)
    state = tmp_path / "state"
    cfg = tmp_path / "client.json"
    with running(
        state,
        images,
        scheduler_listen=f"127.0.0.1:{free_port()}",
        hostd_listen=f"127.0.0.1:{free_port()}",
        cpu_total=4,
        mem_total=4096,
    ) as stack:
        configure_client(stack.scheduler, stack.token, cfg)
        r = tt("env", "add", "half", "--os-prefix", "debian", "--mem", "384", config=cfg)
        assert r.returncode == 1, r.stdout
        assert "could not be created (nothing was kept)" in r.stderr
        assert "debian-13-amd64" in r.stderr
        assert json.loads(tt("env", "list", "--json", config=cfg).stdout) == []
        assert not qemu_pids(str(state), templates=False)
        assert list((state / "hostd" / "vms").iterdir()) == []
        host = json.loads(tt("status", "--server", "--json", config=cfg).stdout)[0]
        assert host["used"] == {"cpus": 0, "memory_mib": 0, "disk_gib": 0}
    assert leftovers(state) == []
