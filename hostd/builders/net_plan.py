"""Network plan of a host: names, subnets, addresses and MACs for ENVs and VMs. Pure.

Interface names are at most 15 characters (IFNAMSIZ); every name carries the host's prefix so a
restarted hostd can find (and reap) what it made.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from ttci.model.errors import TTError

__all__ = [
    "IFNAMSIZ",
    "EnvNet",
    "NetPlanError",
    "allocate_subnet",
    "bridge_name",
    "check_ifname",
    "guest_net_script",
    "kernel_dns_arg",
    "kernel_ip_arg",
    "link_prefixes",
    "mac_address",
    "resolv_conf",
    "tap_name",
]

IFNAMSIZ = 15


class NetPlanError(TTError):
    """The pool of subnets or addresses is used up, or a name does not fit."""


def _short(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bridge_name(host_key: str, env: str) -> str:
    """`ttb` + the hostd's 6-character key + 5 of the ENV's hash: 14 characters."""
    return f"ttb{host_key[:6]}{_short(host_key + '/' + env, 5)}"


def tap_name(host_key: str, vm_id: str) -> str:
    """`ttt` + the hostd's key + 6 of the VM's hash: 15 characters."""
    return f"ttt{host_key[:6]}{_short(host_key + '/' + vm_id, 6)}"


def link_prefixes(host_key: str) -> tuple[str, str]:
    """The name prefixes of one hostd's links: what it may reap, and only it."""
    return f"ttb{host_key[:6]}", f"ttt{host_key[:6]}"


def mac_address(vm_id: str) -> str:
    """A stable, locally administered unicast MAC in QEMU's 52:54:00 range."""
    h = _short("mac:" + vm_id, 6)
    return "52:54:00:" + ":".join(h[i : i + 2] for i in range(0, 6, 2))


@dataclass(frozen=True)
class EnvNet:
    env: str
    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    def vm_address(self, index: int) -> ipaddress.IPv4Interface:
        """The index-th VM's address (0-based; the gateway takes the first host address)."""
        hosts = self.subnet.num_addresses - 3  # network, gateway, broadcast
        if not 0 <= index < hosts:
            raise NetPlanError(
                f"ENV {self.env}'s subnet {self.subnet} has room for {hosts} VMs",
                hint="use a bigger --env-prefix-len on this host",
            )
        return ipaddress.IPv4Interface(
            f"{self.subnet.network_address + 2 + index}/{self.subnet.prefixlen}"
        )


def allocate_subnet(pool: str, prefix_len: int, taken: set[str]) -> ipaddress.IPv4Network:
    """The first subnet of pool (e.g. 10.77.0.0/16) of size /prefix_len that overlaps no
    network in taken (ours, and those already on the host's interfaces)."""
    net = ipaddress.IPv4Network(pool)
    if prefix_len < net.prefixlen or prefix_len > 29:
        raise NetPlanError(
            f"/{prefix_len} subnets do not fit pool {pool}",
            hint="pick a prefix length between the pool's and /29",
        )
    busy = [ipaddress.IPv4Network(t, strict=False) for t in taken]
    for sub in net.subnets(new_prefix=prefix_len):
        if not any(sub.overlaps(b) for b in busy):
            return sub
    raise NetPlanError(
        f"all /{prefix_len} subnets of {pool} are in use",
        hint="delete ENVs or give hostd a bigger --vm-net-pool",
    )


def kernel_ip_arg(addr: ipaddress.IPv4Interface, gateway: ipaddress.IPv4Address | None) -> str:
    """`tt.ip=ADDR/LEN[,GW]` for the guest's init (no gateway: no route out at all)."""
    return f"tt.ip={addr.with_prefixlen}" + (f",{gateway}" if gateway else "")


def kernel_dns_arg(servers: tuple[str, ...]) -> str:
    """`tt.dns=ADDR[,ADDR]`: the guest's resolvers (its ENV's forwarder); "" for none, and
    then the guest's init writes a resolv.conf without servers."""
    return f"tt.dns={','.join(servers)}" if servers else ""


def resolv_conf(servers: tuple[str, ...]) -> str:
    """The guest's /etc/resolv.conf, as its init writes it from tt.dns= (never the build
    machine's: images carry none)."""
    if not servers:
        return (
            "# tt: the ENV of this VM resolves no names (no tt.dns= on the kernel command line)\n"
        )
    lines = ["# tt: the DNS forwarder of the ENV of this VM (tt.dns= on the kernel command line)"]
    lines += [f"nameserver {s}" for s in servers[:3]]
    return "\n".join([*lines, "options timeout:2 attempts:2"]) + "\n"


def guest_net_script(
    addr: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address | None,
    servers: tuple[str, ...],
) -> str:
    """A shell script that gives a running guest its network as the kernel command line would
    (for a VM restored from a snapshot, whose command line was another VM's)."""
    lines = [
        "ip addr flush dev eth0",
        f"ip addr add {addr.with_prefixlen} dev eth0",
        "ip link set eth0 up",
    ]
    if gateway:
        lines.append(f"ip route replace default via {gateway} dev eth0")
    body = resolv_conf(servers)  # no quote in it: safe inside '...'
    lines += ["rm -f /etc/resolv.conf", f"printf '%s' '{body}' > /etc/resolv.conf"]
    return "\n".join(lines) + "\n"


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise NetPlanError(f"interface name {name!r} is longer than {IFNAMSIZ}")
    return name
