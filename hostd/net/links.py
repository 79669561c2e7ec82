"""Bridges and taps through pyroute2 (netlink), inside a network namespace or the host's.

Every function is idempotent, so clean-up after a crash is "make it absent" again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from hostd.builders.net_plan import check_ifname
from ttci.model.errors import TTError

__all__ = ["LinkError", "ensure_bridge", "ensure_tap", "host_networks", "our_links", "remove_link"]


class LinkError(TTError):
    """The kernel refused a link operation."""


@contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    ipr = NetNS(netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure_bridge(name: str, gateway: ipaddress.IPv4Interface, netns: str | None = None) -> None:
    """A bridge with the ENV's gateway address, up. Raises LinkError."""
    check_ifname(name)
    try:
        with _ipr(netns) as ipr:
            if _index(ipr, name) is None:
                ipr.link("add", ifname=name, kind="bridge")
            idx = _index(ipr, name)
            addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
            if str(gateway.ip) not in addrs:
                ipr.addr(
                    "add", index=idx, address=str(gateway.ip), prefixlen=gateway.network.prefixlen
                )
            ipr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise LinkError(f"bridge {name}: {e}") from e


def ensure_tap(name: str, bridge: str, netns: str | None = None) -> None:
    """A tap (for QEMU) attached to bridge, up. Raises LinkError."""
    check_ifname(name)
    try:
        with _ipr(netns) as ipr:
            if _index(ipr, name) is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            br = _index(ipr, bridge)
            if br is None:
                raise LinkError(f"tap {name}: bridge {bridge} does not exist")
            ipr.link("set", index=_index(ipr, name), master=br, state="up")
    except NetlinkError as e:
        raise LinkError(f"tap {name}: {e}") from e


def remove_link(name: str, netns: str | None = None) -> bool:
    """Delete a link if it exists; True when something was removed."""
    try:
        with _ipr(netns) as ipr:
            idx = _index(ipr, name)
            if idx is None:
                return False
            ipr.link("del", index=idx)
            return True
    except NetlinkError as e:
        raise LinkError(f"removing {name}: {e}") from e


def our_links(prefixes: tuple[str, ...] = ("ttb", "ttt"), netns: str | None = None) -> list[str]:
    """Links we made (by name prefix): what a restarted hostd reconciles or reaps."""
    with _ipr(netns) as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(prefixes))


def host_networks(netns: str | None = None) -> set[str]:
    """IPv4 networks on the interfaces (of netns or the host): never hand one to an ENV."""
    with _ipr(netns) as ipr:
        return {
            str(ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network)
            for a in ipr.get_addr(family=socket.AF_INET)
        }
