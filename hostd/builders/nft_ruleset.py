"""The one nftables table of a hostd, built as text from plain values (no I/O).

Applied in one `nft -f` transaction (the table is deleted and recreated, so every change is
atomic and nothing stale survives). Policy:
- NAT: masquerade ENV traffic leaving through the host, for ENVs that may go out;
- `--deny-outgoing` ENVs reach nothing but their own bridge;
- ENVs never reach each other, and no VM reaches the host itself (hostd, scheduler, libvirt);
- port maps: host port -> VM address:port through one DNAT map, also for connections made on
  the host itself (loopback included: the ENV bridges get route_localnet); mapped connections are
  masqueraded to the gateway, so a VM without a route out still answers them;
- nothing else opens a connection into an ENV;
- an ENV with a DNS forwarder reaches its gateway's port 53 (tcp and udp), and nothing else of
  the host. Egress allow-lists live in each ENV's own table (hostd.builders.egress_plan).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = ["EnvRules", "HostRules", "PortMap", "delete_script", "ruleset"]


@dataclass(frozen=True)
class EnvRules:
    bridge: str
    subnet: ipaddress.IPv4Network
    deny_outgoing: bool = False
    dns: bool = False  # a DNS forwarder listens on the gateway for this ENV

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())


@dataclass(frozen=True)
class PortMap:
    host_port: int
    vm_ip: ipaddress.IPv4Address
    vm_port: int
    proto: str = "tcp"


@dataclass(frozen=True)
class HostRules:
    table: str  # e.g. ttci_host1
    envs: tuple[EnvRules, ...] = ()
    ports: tuple[PortMap, ...] = field(default=())
    # Control-plane addresses elsewhere (the scheduler, other hosts) no VM may reach, not
    # even through NAT.
    protected: tuple[ipaddress.IPv4Address, ...] = ()


def ruleset(rules: HostRules) -> str:
    """The full nft script: delete-if-present then create, one transaction."""
    t = rules.table
    lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{"]
    lines += _sets_and_maps(rules)
    lines += _nat_chains(rules)
    lines += _filter_chains(rules)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _sets_and_maps(rules: HostRules) -> list[str]:
    bridges = [e.bridge for e in rules.envs]
    lines = ["  set env_bridges {", "    type ifname"]
    if bridges:
        lines.append(f"    elements = {{ {', '.join(_q(bridges))} }}")
    lines.append("  }")
    lines += ["  set protected {", "    type ipv4_addr"]
    if rules.protected:
        lines.append(f"    elements = {{ {', '.join(str(a) for a in rules.protected)} }}")
    lines.append("  }")
    for proto in ("tcp", "udp"):
        ports = [p for p in rules.ports if p.proto == proto]
        lines += [f"  map {proto}_ports {{", "    type inet_service : ipv4_addr . inet_service"]
        if ports:
            elems = ", ".join(f"{p.host_port} : {p.vm_ip} . {p.vm_port}" for p in ports)
            lines.append(f"    elements = {{ {elems} }}")
        lines.append("  }")
    return lines


def _nat_chains(rules: HostRules) -> list[str]:
    lines = [
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    iifname @env_bridges return",
        "    dnat ip to tcp dport map @tcp_ports",
        "    dnat ip to udp dport map @udp_ports",
        "  }",
        "  chain output_nat {",
        "    type nat hook output priority -100; policy accept;",
        "    fib daddr type local dnat ip to tcp dport map @tcp_ports",
        "    fib daddr type local dnat ip to udp dport map @udp_ports",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    ct status dnat oifname @env_bridges masquerade",
    ]
    for e in rules.envs:
        if not e.deny_outgoing:
            lines.append(f'    ip saddr {e.subnet} oifname != "{e.bridge}" masquerade')
    lines.append("  }")
    return lines


def _filter_chains(rules: HostRules) -> list[str]:
    lines = [
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        "    iifname @env_bridges ct state established,related accept",
    ]
    for e in rules.envs:
        if e.dns:
            lines.append(
                f'    iifname "{e.bridge}" ip daddr {e.gateway} meta l4proto {{ tcp, udp }} '
                "th dport 53 accept"
            )
    lines += [
        "    iifname @env_bridges drop",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
        "    ct state established,related accept",
        "    iifname @env_bridges ip daddr @protected drop",
    ]
    for e in rules.envs:
        lines.append(f'    iifname "{e.bridge}" oifname "{e.bridge}" accept')
        lines.append(f'    iifname "{e.bridge}" oifname @env_bridges drop')
        if e.deny_outgoing:
            lines.append(f'    iifname "{e.bridge}" drop')
    lines += ["    ct status dnat accept", "    oifname @env_bridges drop", "  }"]
    return lines


def delete_script(table: str) -> str:
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def _q(names: list[str]) -> list[str]:
    return [f'"{n}"' for n in names]
