"""Bridges, taps and the nftables table for real, inside a network namespace the test creates
(nothing touches the host's network; the namespace is removed even when the test fails)."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from hostd.builders.net_plan import EnvNet, allocate_subnet, bridge_name, tap_name
from hostd.builders.nft_ruleset import EnvRules, HostRules, delete_script, ruleset
from hostd.net.links import ensure_bridge, ensure_tap, our_links, remove_link


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"tt-test-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert (
        name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, check=True
    )
    return r.stdout


def test_bridge_tap_and_table_in_a_namespace(netns: str) -> None:
    host_links_before = our_links()
    net = EnvNet("ci-9", bridge_name("abc123", "ci-9"), allocate_subnet("10.77.0.0/16", 24, set()))
    gw = ipaddress.IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}")
    tap = tap_name("abc123", "vm-1")
    for _ in range(2):  # idempotent: a second pass changes nothing and does not fail
        ensure_bridge(net.bridge, gw, netns=netns)
        ensure_tap(tap, net.bridge, netns=netns)
    assert our_links(netns=netns) == sorted([net.bridge, tap])
    links = in_ns(netns, "ip", "-o", "link", "show", tap)
    assert f"master {net.bridge}" in links
    assert "10.77.0.1/24" in in_ns(netns, "ip", "-o", "addr", "show", net.bridge)

    table = HostRules("ttci_nstest", (EnvRules(net.bridge, net.subnet),))
    in_ns(netns, "nft", "-f", "-", stdin=ruleset(table))
    listed = in_ns(netns, "nft", "list", "table", "inet", "ttci_nstest")
    assert net.bridge in listed and "masquerade" in listed
    in_ns(netns, "nft", "-f", "-", stdin=delete_script("ttci_nstest"))
    assert "ttci_nstest" not in in_ns(netns, "nft", "list", "tables")

    assert remove_link(tap, netns=netns) and remove_link(net.bridge, netns=netns)
    assert not remove_link(tap, netns=netns)
    assert our_links(netns=netns) == []
    assert our_links() == host_links_before  # the host's own network was never touched
