"""A small network lab for tests: namespaces on a bridge, all made here and all removed again.

Only addresses this module creates are used; no namespace gets a default route, so nothing a test
does can leave for the real network (docs/facts/networking.md: network safety).
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout).stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.250.0.0/16 that overlaps nothing on this machine."""
    used = [
        ipaddress.IPv4Interface(w).network
        for line in sh("ip", "-4", "-o", "addr").stdout.splitlines()
        for w in line.split()
        if "/" in w and w[0].isdigit()
    ]
    for sub in ipaddress.IPv4Network("10.250.0.0/16").subnets(new_prefix=24):
        if not any(sub.overlaps(u) for u in used):
            return sub
    raise AssertionError("no free test subnet in 10.250.0.0/16")


@dataclass
class Lab:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"tlb{self.tag}"

    def addr(self, n: int) -> str:
        return str(self.subnet.network_address + n)

    def up(self) -> str:
        """The lab bridge in the root namespace; returns its address."""
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.addr(1)}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self.addr(1)

    def node(self, name: str, n: int) -> str:
        """A namespace on the lab bridge with address .n (no default route); returns its name."""
        ns = f"tl{self.tag}{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        outer, inner = f"tlv{self.tag}{name}", f"tli{self.tag}{name}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", outer, "master", self.bridge, "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        # A new namespace copies the root's ip_forward: start from 0, as hostds must leave it.
        in_ns(ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
        in_ns(ns, "ip", "addr", "add", f"{self.addr(n)}/{self.subnet.prefixlen}", "dev", inner)
        in_ns(ns, "ip", "link", "set", inner, "up")
        return ns

    def add_addr(self, name: str, n: int) -> str:
        """One more lab address (.n) on a node (a second server address); returns it."""
        in_ns(f"tl{self.tag}{name}", "ip", "addr", "add", f"{self.addr(n)}/{self.subnet.prefixlen}",
              "dev", f"tli{self.tag}{name}")  # fmt: skip
        return self.addr(n)

    def fake_vm(self, host: str, name: str, bridge: str, ip: str, gateway: str | None) -> str:
        """A namespace standing in for a VM: a veth whose other end is a port of bridge (an ENV
        bridge in node host's namespace), with address ip (ADDR/LEN) and a default route to
        gateway (if any). Its resolver is whatever the test queries explicitly: never run
        getaddrinfo in it (it would read this machine's /etc/resolv.conf)."""
        ns = f"tl{self.tag}v{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        outer, inner = f"tlf{self.tag}{name}", f"tlg{self.tag}{name}"
        host_ns = f"tl{self.tag}{host}"
        sh("ip", "link", "add", outer, "netns", host_ns, "type", "veth", "peer", "name", inner,
           "netns", ns)  # fmt: skip
        in_ns(host_ns, "ip", "link", "set", outer, "master", bridge, "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "addr", "add", ip, "dev", inner)
        in_ns(ns, "ip", "link", "set", inner, "up")
        if gateway:
            in_ns(ns, "ip", "route", "add", "default", "via", gateway)
        return ns

    def cut(self, name: str, down: bool = True) -> None:
        """Pull (or put back) a node's cable."""
        sh("ip", "link", "set", f"tlv{self.tag}{name}", "down" if down else "up")

    def down(self) -> list[str]:
        """Remove everything; returns what could not be removed."""
        problems = []
        for ns in reversed(self.namespaces):
            r = sh("ip", "netns", "del", ns, check=False)
            if r.returncode:
                problems.append(f"netns {ns}: {r.stderr.strip()}")
        for link in reversed(self.links):
            sh("ip", "link", "del", link, check=False)
        left = sh("ip", "-o", "link").stdout
        problems += [f"link {x}" for x in self.links if f" {x}:" in left or f" {x}@" in left]
        return problems


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """A lab that is removed, and ip_forward put back, however the test ends."""
    before = FORWARD.read_text()
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        problems = the_lab.down()
        FORWARD.write_text(before)
        assert not problems, problems


def dns_server(ns: str, addr: str, records: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """An authoritative-only DNS server in namespace ns on addr:53 answering records (name ->
    IPv4, TTL 60 s) and REFUSED for anything else: it never forwards a query anywhere. The
    upstream a test gives hostd's forwarders, so no query can reach a real resolver."""
    argv = [
        "ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--conf-file", "--no-resolv",
        "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={addr}", "--port=53",
        "--pid-file", "--local-ttl=60", f"--log-facility={log}", "--log-queries",
        *(f"--address=/{name}/{ip}" for name, ip in records.items()),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    wait_listening(ns, addr, 53, "udp")
    return proc


def lab_servers(ns: str, log: Path, *specs: str) -> subprocess.Popen[bytes]:
    """tests.lab_servers in namespace ns (specs: `--http ADDR:PORT:NAME`, `--git ...`)."""
    import sys

    root = Path(__file__).resolve().parent.parent
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lab_servers", "--log", str(log)]
    proc = subprocess.Popen([*argv, *specs], cwd=root, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert b"ready" in line, line
    return proc


def wait_listening(ns: str, addr: str, port: int, proto: str = "tcp", timeout: float = 10) -> None:
    import time

    flag = "-u" if proto == "udp" else "-t"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{addr}:{port} " in in_ns(ns, "ss", "-lnH", flag, check=False):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {addr}:{port}/{proto} in {ns}")
