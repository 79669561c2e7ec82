"""The network plan and the nftables ruleset builder (pure), with every generated ruleset checked
by the real `nft -c` (check mode: the kernel validates the transaction, nothing is applied)."""

import ipaddress
import re
import subprocess
from pathlib import Path

import pytest

from hostd.builders.net_plan import (
    IFNAMSIZ,
    EnvNet,
    NetPlanError,
    allocate_subnet,
    bridge_name,
    kernel_ip_arg,
    link_prefixes,
    mac_address,
    tap_name,
)
from hostd.builders.nft_ruleset import EnvRules, HostRules, PortMap, delete_script, ruleset


def nft_check(script: str, tmp_path: Path) -> None:
    f = tmp_path / "rules.nft"
    f.write_text(script)
    before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + script
    after = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert before == after  # check mode changed nothing


def test_names_fit_ifnamsiz_and_are_stable() -> None:
    for make in (bridge_name, tap_name):
        names = {make("a1b2c3", f"env-{i}") for i in range(1000)}
        assert len(names) == 1000
        assert all(len(n) <= IFNAMSIZ for n in names)
        assert make("a1b2c3", "x") == make("a1b2c3", "x") != make("d4e5f6", "x")
        assert make("a1b2c3", "x").startswith(link_prefixes("a1b2c3"))
    mac = mac_address("vm-1")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac) and mac == mac_address("vm-1")


def test_subnets_and_addresses() -> None:
    first = allocate_subnet("10.77.0.0/16", 24, set())
    assert str(first) == "10.77.0.0/24"
    assert str(allocate_subnet("10.77.0.0/16", 24, {"10.77.0.0/24"})) == "10.77.1.0/24"
    # Networks already on the host (any size) are never handed out.
    assert str(allocate_subnet("10.77.0.0/16", 24, {"10.77.0.0/23"})) == "10.77.2.0/24"
    with pytest.raises(NetPlanError, match="in use"):
        allocate_subnet("10.77.0.0/23", 24, {"10.77.0.0/24", "10.77.1.0/24"})
    net = EnvNet("ci-1", bridge_name("a1b2c3", "ci-1"), first)
    assert str(net.gateway) == "10.77.0.1"
    assert str(net.vm_address(0)) == "10.77.0.2/24"
    assert str(net.vm_address(252)) == "10.77.0.254/24"
    with pytest.raises(NetPlanError, match="room for 253 VMs"):
        net.vm_address(253)
    assert kernel_ip_arg(net.vm_address(0), None) == "tt.ip=10.77.0.2/24"
    assert kernel_ip_arg(net.vm_address(0), net.gateway) == "tt.ip=10.77.0.2/24,10.77.0.1"


def test_ruleset_policy_and_validity(tmp_path: Path) -> None:
    a = EnvRules("ttbr-a", ipaddress.ip_network("10.77.0.0/24"))
    b = EnvRules("ttbr-b", ipaddress.ip_network("10.77.1.0/24"), deny_outgoing=True)
    rules = HostRules(
        "ttci_test",
        (a, b),
        (
            PortMap(30022, ipaddress.ip_address("10.77.0.2"), 22),
            PortMap(30053, ipaddress.ip_address("10.77.0.3"), 53, "udp"),
        ),
        (ipaddress.IPv4Address("192.0.2.10"),),
    )
    script = ruleset(rules)
    nft_check(script, tmp_path)
    assert 'ip saddr 10.77.0.0/24 oifname != "ttbr-a" masquerade' in script
    assert "10.77.1.0/24" not in script.split("chain postrouting")[1].split("}")[0]  # no NAT
    assert 'iifname "ttbr-a" oifname @env_bridges drop' in script  # no ENV reaches another
    assert 'iifname "ttbr-b" drop' in script  # --deny-outgoing
    assert "iifname @env_bridges drop" in script  # VMs never reach the host itself
    assert "elements = { 192.0.2.10 }" in script  # nor the scheduler, even through NAT
    assert "iifname @env_bridges ip daddr @protected drop" in script
    assert "30022 : 10.77.0.2 . 22" in script and "30053 : 10.77.0.3 . 53" in script
    assert script.rstrip().endswith("oifname @env_bridges drop\n  }\n}")  # nothing else gets in


def test_empty_and_delete_scripts_are_valid(tmp_path: Path) -> None:
    nft_check(ruleset(HostRules("ttci_empty")), tmp_path)
    nft_check(delete_script("ttci_empty"), tmp_path)


def test_a_thousand_port_maps_are_one_script(tmp_path: Path) -> None:
    ports = tuple(
        PortMap(20000 + i, ipaddress.ip_address(f"10.77.{i // 250}.{2 + i % 250}"), 22)
        for i in range(1000)
    )
    nft_check(ruleset(HostRules("ttci_big", (), ports)), tmp_path)
