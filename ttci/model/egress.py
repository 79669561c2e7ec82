"""Egress allow-lists as users write them (`--allow-egress 'git.example.com,*.pypi.org,
10.1.0.0/16:443'`). Pure.

A rule is a host name, a wildcard name or an IPv4 network (an address is a /32), with an optional
`:PORT` (tcp and udp). A name covers itself and every name under it (`example.com` also allows
`www.example.com`); `*.example.com` covers only the names under it. Names are enforced through
DNS: the ENV's forwarder resolves only names on the list and lets through the addresses it
answered. Networks are enforced as they are.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ttci.model.errors import BadInput

__all__ = [
    "MAX_EGRESS_RULES",
    "EgressRule",
    "egress_text",
    "merge_rules",
    "parse_egress",
    "parse_rule",
]

MAX_EGRESS_RULES = 200
_LABEL = re.compile(r"\A[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_HINT = "e.g. --allow-egress 'gitlab.example.com,*.pypi.org,10.1.0.0/16:443'"


@dataclass(frozen=True, order=True)
class EgressRule:
    """One allowed destination: kind "name" (host, wildcard `*.` allowed first) or "net"."""

    kind: str  # "name" or "net"
    host: str  # a lower-case name (maybe `*.name`) or a network in CIDR form
    port: int | None = None  # None: every port

    @property
    def text(self) -> str:
        host = self.host
        if self.kind == "net" and host.endswith("/32"):
            host = host[:-3]
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def domain(self) -> str:
        """The name without its wildcard (what DNS matching works on)."""
        return self.host.removeprefix("*.")

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    @property
    def network(self) -> ipaddress.IPv4Network:
        if self.kind != "net":
            raise ValueError(f"{self.text} is a name, not a network")
        return ipaddress.IPv4Network(self.host)


def _bad(text: str, why: str) -> BadInput:
    return BadInput(f"egress rule {text!r} {why}", hint=_HINT)


def _port(text: str, raw: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= 65535:
        raise _bad(text, "has a port outside 1-65535")
    return int(raw)


def _name(text: str, host: str) -> str:
    name = host.rstrip(".")
    base = name.removeprefix("*.")
    if "*" in base:
        raise _bad(text, "may have a wildcard only as its first label (`*.example.com`)")
    labels = base.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise _bad(text, "is neither a host name with a dot, nor an IPv4 address or network")
    if labels[-1].isdigit():
        raise _bad(text, "looks like an address but is not a valid IPv4 address")
    return name


def parse_rule(text: str) -> EgressRule:
    """`host[:port]`, `*.host[:port]`, `A.B.C.D[/LEN][:port]` -> EgressRule (BadInput if not)."""
    t = str(text).strip().lower()
    if not t:
        raise _bad(text, "is empty")
    if t.startswith("[") or t.count(":") > 1:
        raise _bad(text, "is IPv6, and VM networks are IPv4 only")
    host, sep, raw_port = t.partition(":")
    port = _port(text, raw_port) if sep else None
    if host and (host[0].isdigit() and re.fullmatch(r"[0-9./]+", host)):
        try:
            net = ipaddress.IPv4Network(host, strict=False)
        except ValueError as e:
            raise _bad(text, f"is not a valid IPv4 address or network ({e})") from None
        return EgressRule("net", str(net), port)
    return EgressRule("name", _name(text, host), port)


def parse_egress(spec: Any) -> tuple[EgressRule, ...]:
    """A comma-separated text or a list of rule texts -> the rules, sorted and without
    repeats. Raises BadInput naming the rule that is wrong."""
    if spec is None or spec == "":
        return ()
    if isinstance(spec, str):
        items: list[Any] = spec.replace("\n", ",").split(",")
    elif isinstance(spec, list | tuple):
        items = [x for item in spec for x in str(item).split(",")]
    else:
        raise BadInput(f"allow_egress {spec!r} is not a list of rules", hint=_HINT)
    if len(items) > 10 * MAX_EGRESS_RULES:  # refused before parsing each
        raise BadInput(f"the egress allow-list has {len(items)} entries", hint=_HINT)
    rules = {parse_rule(x) for x in items if str(x).strip()}
    if len(rules) > MAX_EGRESS_RULES:
        raise BadInput(
            f"the egress allow-list has {len(rules)} rules, more than {MAX_EGRESS_RULES}",
            hint="use wildcards (*.example.com) or networks to shorten it",
        )
    return tuple(sorted(rules))


def merge_rules(*lists: tuple[EgressRule, ...]) -> tuple[EgressRule, ...]:
    return tuple(sorted({r for rules in lists for r in rules}))


def egress_text(rules: tuple[EgressRule, ...]) -> list[str]:
    return [r.text for r in rules]
