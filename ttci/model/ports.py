"""VM port lists as users write them (`--vm-port 22,8080,53/udp`). Pure."""

from __future__ import annotations

import re
from typing import Any

from ttci.model.errors import BadInput

__all__ = ["parse_ports", "ports_text"]


def parse_ports(spec: Any) -> list[tuple[int, str]]:
    """ "22,8080,53/udp" or [22, "53/udp"] -> [(22, "tcp"), (8080, "tcp"), (53, "udp")]."""
    if spec is None:
        return []
    if isinstance(spec, str):
        items: list[Any] = spec.split(",")
    elif isinstance(spec, list | tuple):
        items = list(spec)
    else:
        raise BadInput(f"VM ports {spec!r} are not a list", hint="e.g. --vm-port 22,8080")
    out: list[tuple[int, str]] = []
    seen: set[tuple[int, str]] = set()
    for item in items:
        text = str(item).strip().lower() if isinstance(item, str | int) else "?"
        if not text:
            continue
        port, _, proto = text.partition("/")
        proto = proto or "tcp"
        if (
            not re.fullmatch(r"[0-9]{1,5}", port)
            or not 1 <= int(port) <= 65535
            or proto not in ("tcp", "udp")
        ):
            raise BadInput(
                f"VM port {item!r} is not valid", hint="e.g. --vm-port 22,8080,53/udp (1-65535)"
            )
        if (int(port), proto) in seen:
            raise BadInput(
                f"VM port {int(port)}/{proto} is asked for twice",
                hint="name each port once in --vm-port",
            )
        out.append((int(port), proto))
        seen.add((int(port), proto))
    return out


def ports_text(ports: list[tuple[int, str]]) -> str:
    return ",".join(f"{p}/{proto}" for p, proto in ports)
