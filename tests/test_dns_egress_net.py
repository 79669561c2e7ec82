"""DNS forwarders and egress allow-lists for real, without VMs: hostd's network manager runs in a
lab namespace ("h"), a namespace on an ENV's bridge stands in for a VM, and an "outside"
namespace ("o") holds the only DNS server (authoritative, it forwards nothing) and the HTTP
servers there are. Names resolve only through the ENV's forwarder, which forwards only to that
server; no namespace has a route anywhere else (docs/facts/networking.md: network safety).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hostd.net.dns import find_processes
from hostd.net.manager import host_key
from tests.netlab import Lab, dns_server, in_ns, lab, lab_servers
from ttci.infra.proc import stop

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class World:
    lab: Lab
    state: Path
    dns: str
    git: str
    web: str
    other: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def host_ns(self) -> str:
        return f"tl{self.lab.tag}h"

    def net(self, op: str, *args: str, default: str = "", **flags: str | bool) -> dict[str, Any]:
        """One NetManager operation in the host namespace (tests.lab_hostnet)."""
        argv = [
            "nsenter", f"--net=/run/netns/{self.host_ns}", sys.executable, "-m",
            "tests.lab_hostnet", str(self.state), "--dns", self.dns, "--default", default,
            op, *args,
        ]  # fmt: skip
        for k, v in flags.items():
            if v is True:
                argv.append(f"--{k}")
            elif v:
                argv += [f"--{k}", str(v)]
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[-1])
        out["result"]["_seconds"] = out["seconds"]
        return dict(out["result"])

    def vm(self, name: str, vmnet: dict[str, Any]) -> str:
        return self.lab.fake_vm("h", name, vmnet["bridge"], vmnet["ip"], vmnet["gateway"])

    def probe(self, ns: str, *args: str) -> dict[str, Any]:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lab_probe", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return dict(json.loads(r.stdout))

    def forwarders(self) -> dict[int, Path]:
        return find_processes(self.state / "dns")

    def tables(self) -> list[str]:
        return [t for t in in_ns(self.host_ns, "nft", "list", "tables").split() if "ttci_" in t]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("dnsegress")
    with lab() as the_lab:
        the_lab.up()
        host = the_lab.node("h", 11)
        out = the_lab.node("o", 100)
        w = World(
            the_lab, tmp / "state", the_lab.addr(100),
            the_lab.add_addr("o", 101), the_lab.add_addr("o", 102), the_lab.add_addr("o", 103),
        )  # fmt: skip
        try:
            records = {"git.test.lan": w.git, "web.test.lan": w.web, "other.test.lan": w.other}
            w.procs.append(dns_server(out, w.dns, records, tmp / "upstream.log"))
            servers = [f"{w.git}:80:git", f"{w.web}:80:web", f"{w.web}:81:web81"]
            servers.append(f"{w.other}:80:other")
            specs = [x for s in servers for x in ("--http", s)]
            w.procs.append(lab_servers(out, tmp / "servers.log", *specs))
            yield w
        finally:
            w.net("teardown")
            left = w.forwarders()
            for p in w.procs:
                stop(p, grace=2)
                if p.stdout:
                    p.stdout.close()
            assert left == {}, left
            assert w.tables() == []
            assert in_ns(host, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"


def test_a_name_on_the_list_resolves_and_is_reached_and_nothing_else(world: World) -> None:
    vmnet = world.net("attach", "e1", "v1", allow="git.test.lan")
    gw = vmnet["gateway"]
    assert vmnet["dns"] == [gw] and f"tt.dns={gw}" in vmnet["kernel_arg"]
    vm = world.vm("v1", vmnet)
    try:
        first = world.probe(vm, "dns", gw, "git.test.lan")
        assert first["rcode"] == "NOERROR" and first["answers"][0][0] == world.git, first
        # Names off the list do not resolve: no lookups as a side channel.
        assert world.probe(vm, "dns", gw, "other.test.lan")["rcode"] == "REFUSED"
        assert world.probe(vm, "get", world.git, "80")["body"] == "hello from git\n"
        # Not by address either, and not another server that DNS never named.
        assert "error" in world.probe(vm, "get", world.other, "80", "1")
        assert "error" in world.probe(vm, "get", world.web, "80", "1")
        info = world.net("info", "e1")
        assert (info["mode"], info["allow"], info["resolver"]) == ("enforce", ["git.test.lan"], gw)
        assert info["denied"] >= 2, info  # each denied flow counts once, retries do not
        where = {(b["addr"], b["port"], b["proto"]) for b in info["blocked"]}
        assert {(world.other, 80, "tcp"), (world.web, 80, "tcp")} <= where
        assert world.net("counts")["e1"] == ["enforce", info["denied"]]
    finally:
        world.net("detach", "v1")
    assert world.forwarders() == {} and world.tables() == []


def test_networks_and_ports_are_allowed_as_written(world: World) -> None:
    vmnet = world.net("attach", "e2", "v2", allow=f"{world.web}:80,{world.other}/32")
    vm = world.vm("v2", vmnet)
    try:
        assert world.probe(vm, "get", world.web, "80")["body"] == "hello from web\n"
        assert "error" in world.probe(vm, "get", world.web, "81", "1")  # another port
        assert world.probe(vm, "get", world.other, "80")["body"] == "hello from other\n"
        assert "error" in world.probe(vm, "get", world.git, "80", "1")
        # No name is on the list: none resolves.
        assert world.probe(vm, "dns", vmnet["gateway"], "web.test.lan")["rcode"] == "REFUSED"
    finally:
        world.net("detach", "v2")


def test_audit_mode_blocks_nothing_and_names_what_it_would_have(world: World) -> None:
    vmnet = world.net("attach", "e3", "v3", allow="git.test.lan", audit=True)
    gw = vmnet["gateway"]
    vm = world.vm("v3", vmnet)
    try:
        for name, addr in (("git.test.lan", world.git), ("other.test.lan", world.other)):
            assert world.probe(vm, "dns", gw, name)["answers"][0][0] == addr
        assert world.probe(vm, "get", world.git, "80")["body"] == "hello from git\n"
        assert world.probe(vm, "get", world.other, "80")["body"] == "hello from other\n"
        info = world.net("info", "e3")
        assert info["mode"] == "audit" and info["denied"] >= 1
        [b] = info["blocked"]
        assert (b["addr"], b["port"], b["names"]) == (world.other, 80, ["other.test.lan"])
    finally:
        world.net("detach", "v3")


def test_an_env_without_a_list_resolves_anything_and_one_denied_outgoing_nothing(
    world: World,
) -> None:
    open_net = world.net("attach", "e4", "v4")
    deny_net = world.net("attach", "e5", "v5", deny=True)
    assert open_net["dns"] == [open_net["gateway"]] and open_net["gateway"]
    assert deny_net["dns"] == [] and deny_net["gateway"] is None
    assert "tt.dns" not in deny_net["kernel_arg"]
    vm4, vm5 = world.vm("v4", open_net), world.vm("v5", deny_net)
    try:
        assert world.probe(vm4, "dns", open_net["gateway"], "other.test.lan")["rcode"] == "NOERROR"
        assert world.probe(vm4, "get", world.other, "80")["body"] == "hello from other\n"
        assert world.net("info", "e4")["mode"] == "open"
        # The denied ENV's gateway answers no DNS (no forwarder, port 53 closed to it).
        gw5 = deny_net["ip"].rsplit(".", 1)[0] + ".1"
        assert "error" in world.probe(vm5, "dns", gw5, "git.test.lan", "1")
        assert world.net("info", "e5")["mode"] == "deny"
        assert len(world.forwarders()) == 1  # e4's only
        assert world.tables() == [f"ttci_{host_key(world.state)}"]  # no ENV table
    finally:
        world.net("detach", "v4")
        world.net("detach", "v5")


def test_the_operators_list_applies_to_envs_that_ask_for_none(world: World) -> None:
    vmnet = world.net("attach", "e6", "v6", default="git.test.lan")
    vm = world.vm("v6", vmnet)
    try:
        # A name rule lets an address through once the ENV's forwarder answered with it.
        assert "error" in world.probe(vm, "get", world.git, "80", "1")
        assert world.probe(vm, "dns", vmnet["gateway"], "git.test.lan")["rcode"] == "NOERROR"
        assert world.probe(vm, "get", world.git, "80")["body"] == "hello from git\n"
        assert "error" in world.probe(vm, "get", world.other, "80", "1")
        info = world.net("info", "e6", default="git.test.lan")
        assert (info["mode"], info["allow"]) == ("enforce", ["git.test.lan"])
    finally:
        world.net("detach", "v6", default="git.test.lan")


def test_a_restart_keeps_forwarders_and_counts_and_reaps_what_no_row_owns(world: World) -> None:
    vmnet = world.net("attach", "e7", "v7", allow="git.test.lan")
    vm = world.vm("v7", vmnet)
    gw = vmnet["gateway"]
    assert "error" in world.probe(vm, "get", world.other, "80", "1")
    (pid,) = world.forwarders()
    denied = world.net("info", "e7")["denied"]
    counts = world.net("reconcile", "v7")
    assert counts["dns_kept"] == 1 and list(world.forwarders()) == [pid]
    assert world.net("info", "e7")["denied"] == denied  # the ENV's table was kept as it was
    # A forwarder that died is started again; DNS works after it.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in world.forwarders())
    assert world.net("reconcile", "v7")["dns_started"] == 1
    assert world.probe(vm, "dns", gw, "git.test.lan")["answers"][0][0] == world.git
    # Leftovers of a crash between recording and starting: a forwarder and a table no row owns.
    stray_conf = world.state / "dns" / "stray.conf"
    stray_conf.write_text("port=0\nno-resolv\nno-hosts\n")
    argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={stray_conf}"]
    stray = subprocess.Popen(["ip", "netns", "exec", world.host_ns, *argv])
    key = host_key(world.state)
    in_ns(world.host_ns, "nft", "add", "table", "inet", f"ttci_{key}_zzzzz")
    wait_for(lambda: any(c == stray_conf for c in world.forwarders().values()))
    counts = world.net("reconcile", "v7")
    assert counts["dns_reaped"] == 1 and counts["egress_tables_reaped"] == 1, counts
    stray.wait(timeout=10)
    assert f"ttci_{key}_zzzzz" not in world.tables()
    # A crash after the forwarder started but before its pid was written: it is reaped (it
    # holds the gateway's port 53) and started again.
    (pid,) = world.forwarders()
    with contextlib.closing(sqlite3.connect(world.state / "hostd.db")) as db, db:
        db.execute("update dns_forwarders set pid = 0")
    counts = world.net("reconcile", "v7")
    assert (counts["dns_reaped"], counts["dns_started"]) == (1, 1), counts
    assert pid not in world.forwarders() and len(world.forwarders()) == 1
    assert world.probe(vm, "dns", gw, "git.test.lan")["answers"][0][0] == world.git
    # The VM is gone after a restart: its ENV's forwarder and table go with it.
    assert world.net("reconcile")["vm_nets_dropped"] == 1
    assert world.forwarders() == {} and world.tables() == []


def wait_for(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")
