"""Port maps and `tt env run --use-ssh` on the all-in-one cloud, for real: an image with sshd
(the systemd profile with a test key), a host port chosen for the VM's 22, ssh through it from
the host, and the bad port requests users make."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import ssh_image
from tests.cloudutil import small_cloud, tt
from tests.conftest import CACHE_DIR, IMAGE_PATH

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    _, key, _ = ssh_image(IMAGE_PATH, CACHE_DIR)
    state = tmp_path_factory.mktemp("sshcloud")
    with small_cloud(state, cpu_total=4, mem_total=4096):
        yield state / "client.json", key


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ("22,22", "asked for twice"),
        ("70000", "is not valid"),
        ("ssh", "is not valid"),
        ("53/icmp", "is not valid"),
    ],
)
def test_bad_port_requests_are_refused_up_front(
    cloud: tuple[Path, Path], ports: str, message: str
) -> None:
    cfg, _ = cloud
    r = tt("env", "add", "bad", "--os-prefix", "debian-12:amd64", "--vm-port", ports, config=cfg)
    assert r.returncode == 2 and message in r.stderr and "--vm-port" in r.stderr, r.stderr
    assert tt("env", "show", "bad", config=cfg).returncode != 0  # nothing was made


def test_use_ssh_goes_through_the_port_map(cloud: tuple[Path, Path]) -> None:
    cfg, key = cloud
    r = tt(
        "env", "add", "sshy", "--os-prefix", "debian-12+systemd:amd64", "--mem", "512",
        "--vm-port", "22", config=cfg,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (vm,) = json.loads(tt("env", "show", "sshy", "--json", config=cfg).stdout)["vms"]
    (pm,) = vm["ports"]
    assert pm["vm_port"] == 22 and pm["host"] == "127.0.0.1" and 20000 <= pm["host_port"] <= 29999
    assert f"127.0.0.1:{pm['host_port']}->22" in tt("env", "show", "sshy", config=cfg).stdout
    # Without a port map for 22, --use-ssh says what to do.
    ssh = ("env", "run", "sshy", "--use-ssh", "--ssh-key", str(key))
    deadline = time.monotonic() + 120  # the agent answers early; sshd comes up with systemd
    while True:
        r = tt(*ssh, "--cmd", "echo via-ssh $(id -un)", config=cfg, timeout=120)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0 and "via-ssh root" in r.stdout, r.stdout + r.stderr
    r = tt(*ssh, "--cmd", "exit 3", config=cfg)
    assert r.returncode == 1 and "exit 3" in r.stdout
    assert tt("env", "del", "sshy", config=cfg).returncode == 0


def test_use_ssh_without_a_port_map_says_how_to_get_one(cloud: tuple[Path, Path]) -> None:
    cfg, _ = cloud
    r = tt("env", "add", "nossh", "--os-prefix", "debian-12:amd64", "--mem", "384", config=cfg)
    assert r.returncode == 0, r.stderr
    try:
        r = tt("env", "run", "nossh", "--use-ssh", "--cmd", "true", config=cfg)
        assert r.returncode == 2 and "--vm-port 22" in r.stderr, r.stderr
    finally:
        assert tt("env", "del", "nossh", config=cfg).returncode == 0
