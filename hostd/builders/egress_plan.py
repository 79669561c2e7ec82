"""DNS and egress of one ENV, built as text from plain values (no I/O): the ENV's own nftables
table (its allow-list) and its DNS forwarder's dnsmasq configuration.

An ENV that may go out gets a forwarder on its gateway address. With an allow-list, the ENV also
gets a table of its own, `inet ttci_<host key>_<ENV key>`, whose forward chain runs before the
hostd's main table (priority filter - 10):
- established traffic, traffic into the ENV and traffic within its bridge pass on to the main
  table (which still enforces isolation, the protected addresses and port maps);
- a name rule passes addresses the forwarder answered for that name: dnsmasq adds them to the
  rule's set (`nftset=`), which forgets an address NAME_TIMEOUT_S after its last answer (every
  forwarded answer re-adds it: the forwarder caches a record at most MAX_CACHE_TTL_S, so while a
  name is in use its addresses stay allowed);
- network rules pass as they are; with a port, only to that port (tcp and udp);
- everything else is counted (`denied`, once per source, destination, protocol and port within
  FLOW_S) and remembered (`seen`: destination, protocol, port) and then dropped, or, in audit
  mode, let through.
The table is made once per ENV and kept while the ENV lives (its sets and counter survive the
main table's rebuilds), and deleted with the ENV.

Enforcing, the forwarder resolves only names on the list (anything else is REFUSED: no lookups
as a side channel); in audit mode it resolves every name and logs the answers, so what would have
been blocked can be named.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ttci.model.egress import EgressRule

__all__ = [
    "FLOW_S",
    "MAX_CACHE_TTL_S",
    "NAME_TIMEOUT_S",
    "SEEN_MAX",
    "Blocked",
    "EgressPlan",
    "answers_from_log",
    "blocked_from_json",
    "dnsmasq_conf",
    "egress_delete_script",
    "egress_table_name",
    "egress_table_script",
    "name_sets",
    "parse_upstreams",
]

NAME_TIMEOUT_S = 900  # an answered address stays allowed this long after its last answer
MAX_CACHE_TTL_S = 300  # the forwarder caches records at most this long (then asks again)
FLOW_S = 60  # retries of one denied flow within this window count once
SEEN_MAX = 4096  # denied destinations remembered per ENV (for `tt env show`)
_PROTO = {6: "tcp", 17: "udp"}


@dataclass(frozen=True)
class EgressPlan:
    """What one ENV's DNS and egress look like on this host."""

    env: str
    table: str  # ttci_<host key>_<ENV key>
    bridge: str
    gateway: ipaddress.IPv4Address
    rules: tuple[EgressRule, ...] = ()  # the ENV's own and the operator's, merged
    audit: bool = False  # log and count what would be blocked, block nothing
    upstreams: tuple[str, ...] = ()  # the forwarder's servers (dnsmasq form ADDR[#PORT])

    @property
    def filtered(self) -> bool:
        """Does the ENV get a table of its own (an allow-list, enforced or audited)?"""
        return bool(self.rules) or self.audit

    @property
    def mode(self) -> str:
        if not self.filtered:
            return "open"
        return "audit" if self.audit else "enforce"


def egress_table_name(host_key: str, bridge: str) -> str:
    """The ENV's table: the hostd's table name + `_` + the bridge's ENV part."""
    return f"ttci_{host_key}_{bridge[-5:]}"


def name_sets(rules: tuple[EgressRule, ...]) -> dict[str, list[str]]:
    """The set each name rule's answers go to: `names` (any port) or `names_PORT`, keyed by the
    dnsmasq domain pattern the set is filled for."""
    out: dict[str, list[str]] = {}
    for r in rules:
        if r.kind == "name":
            s = "names" if r.port is None else f"names_{r.port}"
            out.setdefault(r.domain, [])
            if s not in out[r.domain]:
                out[r.domain].append(s)
    return out


def _name_ports(rules: tuple[EgressRule, ...]) -> list[int | None]:
    return sorted({r.port for r in rules if r.kind == "name"}, key=lambda p: (p is not None, p))


def egress_table_script(plan: EgressPlan) -> str:
    """The ENV's whole table: delete-if-present then create, one transaction."""
    t, br = plan.table, plan.bridge
    lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{"]
    for port in _name_ports(plan.rules):
        name = "names" if port is None else f"names_{port}"
        lines.append(
            f"  set {name} {{ type ipv4_addr; flags timeout; timeout {NAME_TIMEOUT_S}s; }}"
        )
    nets = [r for r in plan.rules if r.kind == "net" and r.port is None]
    net_ports = [r for r in plan.rules if r.kind == "net" and r.port is not None]
    lines.append(_set("nets", "ipv4_addr", [r.host for r in nets]))
    lines.append(
        _set("net_ports", "ipv4_addr . inet_service", [f"{r.host} . {r.port}" for r in net_ports])
    )
    flow = "ip saddr . ip daddr . meta l4proto . th dport"
    lines += [
        "  set flows { type ipv4_addr . ipv4_addr . inet_proto . inet_service; "
        f"flags dynamic,timeout; timeout {FLOW_S}s; size 65536; }}",
        "  set seen { type ipv4_addr . inet_proto . inet_service; "
        f"flags dynamic,timeout; timeout 24h; size {SEEN_MAX}; }}",
        "  counter denied {}",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f'    iifname != "{br}" return',
        f'    oifname "{br}" return',
        "    ct state established,related return",
    ]
    for port in _name_ports(plan.rules):
        if port is None:
            lines.append("    ip daddr @names return")
        else:
            lines.append(
                f"    ip daddr @names_{port} meta l4proto {{ tcp, udp }} th dport {port} return"
            )
    lines += [
        "    ip daddr @nets return",
        "    meta l4proto { tcp, udp } ip daddr . th dport @net_ports return",
    ]
    verdict = "return" if plan.audit else "drop"
    lines += [
        f"    meta l4proto {{ tcp, udp }} {flow} @flows update @flows {{ {flow} }} {verdict}",
        f"    meta l4proto {{ tcp, udp }} update @flows {{ {flow} }} "
        f'add @seen {{ ip daddr . meta l4proto . th dport }} counter name "denied" {verdict}',
        '    meta l4proto != { tcp, udp } counter name "denied"',
        f"    {verdict}",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _set(name: str, typ: str, elements: list[str]) -> str:
    elems = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    return f"  set {name} {{ type {typ}; flags interval;{elems} }}"


def egress_delete_script(table: str) -> str:
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def dnsmasq_conf(plan: EgressPlan, pid_file: str, log_file: str) -> str:
    """The forwarder's configuration: on the ENV's gateway only, to plan.upstreams only (never
    /etc/resolv.conf, never /etc/hosts), filling the ENV's sets with the answers of its names."""
    lines = [
        f"# tt-hostd: the DNS forwarder of ENV {plan.env} (mode {plan.mode})",
        f"listen-address={plan.gateway}",
        "bind-interfaces",
        "port=53",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "domain-needed",
        "bogus-priv",
        "cache-size=1000",
        f"max-cache-ttl={MAX_CACHE_TTL_S}",
        f"pid-file={pid_file}",
        f"log-facility={log_file}",
    ]
    if plan.audit:
        lines.append("log-queries")
    if plan.mode == "enforce":
        # Only names on the list are forwarded; the rest get REFUSED (no default server).
        for r in plan.rules:
            if r.kind == "name":
                lines += [f"server=/{r.host}/{up}" for up in plan.upstreams]
    else:
        lines += [f"server={up}" for up in plan.upstreams]
    for domain, sets in sorted(name_sets(plan.rules).items()):
        specs = ",".join(f"4#inet#{plan.table}#{s}" for s in sets)
        lines.append(f"nftset=/{domain}/{specs}")
    return "\n".join(lines) + "\n"


def parse_upstreams(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`10.0.0.53,10.0.0.54:5353` -> dnsmasq's ("10.0.0.53", "10.0.0.54#5353"). Raises
    ValueError naming what does not parse (IPv4 only, like the VM networks)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        addr, sep, port = item.replace("#", ":").partition(":")
        ipaddress.IPv4Address(addr)
        if sep and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{item!r} has no valid port")
        out.append(f"{addr}#{port}" if sep and port != "53" else addr)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Blocked:
    """A destination the ENV was denied (or, in audit mode, would have been)."""

    addr: str
    proto: str
    port: int
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "proto": self.proto,
            "port": self.port,
            "names": list(self.names),
        }


def blocked_from_json(doc: dict[str, Any], names: dict[str, set[str]]) -> list[Blocked]:
    """`nft -j list set inet TABLE seen` -> what was denied, named from the forwarder's answers."""
    out = []
    for item in doc.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []) or []:
            val = elem.get("elem", {}).get("val", elem) if isinstance(elem, dict) else elem
            parts = val.get("concat") if isinstance(val, dict) else None
            if not parts or len(parts) != 3:
                continue
            addr, proto, port = parts
            proto_name = _PROTO.get(proto, str(proto)) if isinstance(proto, int) else str(proto)
            out.append(
                Blocked(str(addr), proto_name, int(port), tuple(sorted(names.get(str(addr), ()))))
            )
    return sorted(out, key=lambda b: (b.addr, b.proto, b.port))


_REPLY = re.compile(r"\breply (\S+) is (\d+\.\d+\.\d+\.\d+)\s*$")


def answers_from_log(text: str, into: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """dnsmasq's `log-queries` lines -> address -> the names it was answered for."""
    out = into if into is not None else {}
    for line in text.splitlines():
        m = _REPLY.search(line)
        if m:
            out.setdefault(m[2], set()).add(m[1].lower())
    return out
