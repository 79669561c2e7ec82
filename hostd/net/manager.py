"""VM networking of one hostd: a bridge and subnet per ENV, a tap per VM, port maps, one table.

Every bridge, tap, address and port is written to hostd's state before it is made; the whole
nftables table is rebuilt from that state in one `nft -f` transaction after each change, so the
kernel's rules are always exactly what the state says. An ENV that may go out also gets a DNS
forwarder on its gateway (hostd.net.dns) and, with an egress allow-list, a table of its own
(hostd.net.egress), both recorded first and kept while the ENV lives. `reconcile` (start-up,
after a crash) removes links, tables and forwarders no row owns and re-applies the table;
`teardown` removes everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from hostd.builders.net_plan import (
    EnvNet,
    allocate_subnet,
    bridge_name,
    kernel_dns_arg,
    kernel_ip_arg,
    link_prefixes,
    mac_address,
    tap_name,
)
from hostd.builders.nft_ruleset import EnvRules, HostRules, PortMap, delete_script, ruleset
from hostd.net import links
from hostd.net.dns import Forwarders
from hostd.net.env_egress import EnvEgress
from ttci.infra.db import Store, now
from ttci.infra.proc import run
from ttci.model.egress import EgressRule, egress_text
from ttci.model.errors import BadInput, TTError
from ttci.wire.envs import VMRequest

__all__ = ["FORWARD", "RUN_DIR", "NetConfig", "NetError", "NetManager", "VmNet", "host_key"]

log = logging.getLogger("hostd.net")
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
RUN_DIR = Path("/run/ttci")


class NetError(TTError):
    """The host could not set up a VM's network."""


@dataclass(frozen=True)
class NetConfig:
    pool: str = "10.213.0.0/16"
    prefix_len: int = 24
    outgoing: bool = True  # may ENVs reach outside through NAT at all (per ENV: deny_outgoing)
    port_range: tuple[int, int] = (20000, 29999)
    public_addr: str = "127.0.0.1"  # where port maps are reached (shown to users)
    protected: tuple[str, ...] = ()  # control-plane addresses VMs never reach (the scheduler)
    dns: tuple[str, ...] = ()  # upstreams of the ENVs' forwarders (ADDR[#PORT]); (): no DNS
    egress_default: tuple[EgressRule, ...] = ()  # allowed to every ENV; the list of those
    # that ask for none (empty: they may reach anything, as without allow-lists)


@dataclass(frozen=True)
class VmNet:
    tap: str
    mac: str
    ip: str  # ADDR/LEN
    gateway: str | None  # None: no route out
    ports: list[dict[str, Any]] = field(default_factory=list)
    dns: tuple[str, ...] = ()  # the guest's resolvers (its ENV's forwarder); (): none

    @property
    def kernel_arg(self) -> str:
        """`tt.ip=...` and `tt.dns=...` for the guest's init."""
        gw = ipaddress.IPv4Address(self.gateway) if self.gateway else None
        args = [kernel_ip_arg(ipaddress.IPv4Interface(self.ip), gw), kernel_dns_arg(self.dns)]
        return " ".join(a for a in args if a)


def host_key(state_dir: Path) -> str:
    """Short and unique per hostd on a machine: names of its links and table carry it."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


class NetManager:
    def __init__(self, store: Store, state_dir: Path, cfg: NetConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.key = host_key(state_dir)
        self.table = f"ttci_{self.key}"
        self.egress = EnvEgress(
            self.key, Forwarders(store, state_dir / "dns"), cfg.dns, cfg.egress_default
        )
        self.lock = threading.RLock()
        try:
            ipaddress.IPv4Network(cfg.pool)
        except ValueError as e:
            raise BadInput(f"--vm-net-pool {cfg.pool!r}: {e}", hint="e.g. 10.213.0.0/16") from e
        lo, hi = cfg.port_range
        if not 1024 <= lo <= hi <= 65535:
            raise BadInput(
                f"port range {lo}-{hi} is not valid", hint="e.g. --port-range 20000-29999"
            )

    @staticmethod
    def migrations() -> list[tuple[str, Any]]:
        def net(db: sqlite_utils.Database) -> None:
            db.table("nets").create(
                {"env": str, "bridge": str, "subnet": str, "deny_outgoing": int, "created_at": str},
                pk="env",
            )
            db.table("vmnets").create(
                {"vm": str, "env": str, "tap": str, "mac": str, "ip": str, "gateway": str},
                pk="vm",
            )
            db.table("ports").create(
                {"host_port": int, "proto": str, "vm": str, "vm_port": int, "vm_ip": str},
                pk=("host_port", "proto"),
            )

        def egress(db: sqlite_utils.Database) -> None:
            db.table("nets").add_column("egress", str, not_null_default="[]")
            db.table("nets").add_column("egress_audit", int, not_null_default=0)

        return [("0003_net", net), ("0004_net_egress", egress), *Forwarders.migrations()]

    # -- names -------------------------------------------------------------------------------
    def bridge_for(self, env: str) -> str:
        return bridge_name(self.key, env)

    def tap_for(self, vm_id: str) -> str:
        return tap_name(self.key, vm_id)

    # -- attach / detach ---------------------------------------------------------------------
    def attach(
        self,
        vm_id: str,
        env: str,
        deny_outgoing: bool,
        ports: list[tuple[int, str]],
        *,
        allow_egress: tuple[EgressRule, ...] = (),
        egress_audit: bool = False,
    ) -> VmNet:
        """Record, then make, the VM's tap (and its ENV's bridge, DNS forwarder and egress
        table); apply the table. The ENV's first VM on this host fixes its egress."""
        deny = deny_outgoing or not self.cfg.outgoing
        with self.lock:
            net = self._env_net(env, deny, allow_egress, egress_audit)
            taken = {r["ip"] for r in self._rows("vmnets", "env = ?", [env])}
            index = 0
            while str(net.vm_address(index)) in taken:
                index += 1
            addr = net.vm_address(index)
            vmnet = {
                "vm": vm_id,
                "env": env,
                "tap": self.tap_for(vm_id),
                "mac": mac_address(f"{self.key}/{vm_id}"),
                "ip": str(addr),
                "gateway": "" if deny else str(net.gateway),
            }
            port_rows = self._claim_ports(vm_id, addr.ip, ports)
            with self.store.lock:
                self.store.db.table("vmnets").insert(vmnet, replace=True)
                self.store.db.table("ports").insert_all(port_rows)
            try:
                links.ensure_bridge(
                    net.bridge, ipaddress.IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}")
                )
                self._localnet(net.bridge)
                links.ensure_tap(vmnet["tap"], net.bridge)
                resolvers = self.egress.ensure(self._rows("nets", "env = ?", [env])[0])
                self.apply()
            except TTError:
                self.detach(vm_id)
                raise
        return VmNet(
            vmnet["tap"],
            vmnet["mac"],
            vmnet["ip"],
            vmnet["gateway"] or None,
            self.ports_of(vm_id),
            resolvers,
        )

    def attach_request(self, req: VMRequest) -> VmNet:
        """attach() for hostd's VM request (its ENV, ports and egress)."""
        return self.attach(
            req.id,
            req.env,
            req.deny_outgoing,
            list(req.ports),
            allow_egress=req.allow_egress,
            egress_audit=req.egress_audit,
        )

    def ports_of(self, vm_id: str) -> list[dict[str, Any]]:
        return [
            {
                "vm_port": r["vm_port"],
                "proto": r["proto"],
                "host": self.cfg.public_addr,
                "host_port": r["host_port"],
            }
            for r in self._rows("ports", "vm = ?", [vm_id])
        ]

    def info(self, vm_id: str) -> dict[str, Any]:
        rows = self._rows("vmnets", "vm = ?", [vm_id])
        if not rows:
            return {}
        return {"ip": rows[0]["ip"].split("/")[0], "ports": self.ports_of(vm_id)}

    def detach(self, vm_id: str) -> None:
        """Remove the VM's tap and ports (and its ENV's bridge when it was the last); idempotent."""
        with self.lock:
            rows = self._rows("vmnets", "vm = ?", [vm_id])
            with contextlib.suppress(TTError):
                links.remove_link(self.tap_for(vm_id))
            with self.store.lock:
                self.store.db.table("ports").delete_where("vm = ?", [vm_id])
                self.store.db.table("vmnets").delete_where("vm = ?", [vm_id])
            for env in {r["env"] for r in rows}:
                if not self._rows("vmnets", "env = ?", [env]):
                    self._drop_env(env)
            self.apply()

    def _drop_env(self, env: str) -> None:
        for row in self._rows("nets", "env = ?", [env]):
            self.egress.drop(row)
        with contextlib.suppress(TTError):
            links.remove_link(self.bridge_for(env))
        with self.store.lock:
            self.store.db.table("nets").delete_where("env = ?", [env])

    def _env_net(self, env: str, deny: bool, allow: tuple[EgressRule, ...], audit: bool) -> EnvNet:
        rows = self._rows("nets", "env = ?", [env])
        if rows:
            return EnvNet(env, rows[0]["bridge"], ipaddress.IPv4Network(rows[0]["subnet"]))
        taken = {r["subnet"] for r in self._rows("nets")} | links.host_networks()
        subnet = allocate_subnet(self.cfg.pool, self.cfg.prefix_len, taken)
        with self.store.lock:
            self.store.db.table("nets").insert(
                {
                    "env": env,
                    "bridge": self.bridge_for(env),
                    "subnet": str(subnet),
                    "deny_outgoing": int(deny),
                    "created_at": now(),
                    "egress": json.dumps(egress_text(allow)),
                    "egress_audit": int(audit),
                }
            )
        return EnvNet(env, self.bridge_for(env), subnet)

    def _claim_ports(
        self, vm_id: str, vm_ip: ipaddress.IPv4Address, ports: list[tuple[int, str]]
    ) -> list[dict[str, Any]]:
        used = {(r["host_port"], r["proto"]) for r in self._rows("ports")}
        lo, hi = self.cfg.port_range
        out = []
        candidate = lo
        for vm_port, proto in ports:
            while candidate <= hi and ((candidate, proto) in used or _bound(candidate, proto)):
                candidate += 1
            if candidate > hi:
                raise NetError(
                    f"no free host port left in {lo}-{hi} for {vm_port}/{proto}",
                    hint="delete ENVs with port maps or give hostd a wider --port-range",
                )
            used.add((candidate, proto))
            out.append(
                {
                    "host_port": candidate,
                    "proto": proto,
                    "vm": vm_id,
                    "vm_port": vm_port,
                    "vm_ip": str(vm_ip),
                }
            )
        return out

    # -- DNS and egress ----------------------------------------------------------------------
    def egress_info(self, env: str) -> dict[str, Any]:
        """The ENV's egress on this host (EnvEgress.info); {} for an ENV it does not have."""
        rows = self._rows("nets", "env = ?", [env])
        return self.egress.info(rows[0]) if rows else {}

    def egress_counts(self) -> dict[str, tuple[str, int]]:
        """ENV -> (mode, connections denied or, in audit mode, that would have been)."""
        return self.egress.counts(self._rows("nets"))

    # -- the table ---------------------------------------------------------------------------
    def rules(self) -> HostRules:
        envs = tuple(
            EnvRules(
                r["bridge"],
                ipaddress.IPv4Network(r["subnet"]),
                bool(r["deny_outgoing"]),
                dns=not r["deny_outgoing"] and bool(self.cfg.dns),
            )
            for r in self._rows("nets")
        )
        ports = tuple(
            PortMap(r["host_port"], ipaddress.IPv4Address(r["vm_ip"]), r["vm_port"], r["proto"])
            for r in self._rows("ports")
        )
        protected = tuple(ipaddress.IPv4Address(a) for a in self.cfg.protected)
        return HostRules(self.table, envs, ports, protected)

    def apply(self) -> None:
        """Make the kernel's table exactly what the state says (one transaction). Forwarding is
        on only while something needs it (an ENV that may go out, or port maps reached from
        other machines) and put back as it was afterwards."""
        rules = self.rules()
        if not rules.envs:
            run(["nft", "-f", "-"], input=delete_script(self.table).encode())
            self._restore_forwarding()
            return
        remote_ports = bool(rules.ports) and not self.cfg.public_addr.startswith("127.")
        if remote_ports or any(not e.deny_outgoing for e in rules.envs):
            self._enable_forwarding()
        else:
            self._restore_forwarding()
        run(["nft", "-f", "-"], input=ruleset(rules).encode())

    def _enable_forwarding(self) -> None:
        """Forwarding on; what it was is kept once per network namespace in /run, since several
        hostds (tests, all-in-one clouds) may share a namespace."""
        with _forward_record() as rec:
            if FORWARD.read_text().strip() == "1":
                return
            if not rec.exists():
                rec.write_text("0")
            FORWARD.write_text("1")
            log.info("ip_forward enabled for VM networks (was 0)")

    def _restore_forwarding(self) -> None:
        """The last hostd of the namespace to lose its VM networks puts forwarding back."""
        with _forward_record() as rec:
            if not rec.exists():
                return
            tables = run(["nft", "list", "tables"]).stdout.decode().split()
            others = [t for t in tables if t.startswith("ttci_") and not self._ours(t)]
            if others:
                return  # another hostd here still forwards; it will put it back
            FORWARD.write_text(rec.read_text().strip() or "0")
            rec.unlink()
            log.info("ip_forward put back to 0")

    def _ours(self, table: str) -> bool:
        """Our table, or one of our ENVs' own (ttci_KEY_ENVKEY)."""
        return table == self.table or table.startswith(f"{self.table}_")

    @staticmethod
    def _localnet(bridge: str) -> None:
        """Let port maps work for connections from the host's own loopback."""
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet").write_text("1")

    # -- restart and shutdown ----------------------------------------------------------------
    def reconcile(self, live_vms: set[str]) -> dict[str, int]:
        """Drop networks of VMs that are gone, links no row owns, then re-apply the table."""
        counts = {"vm_nets_dropped": 0, "links_reaped": 0}
        with self.lock:
            for r in self._rows("vmnets"):
                if r["vm"] not in live_vms:
                    self.detach(r["vm"])
                    counts["vm_nets_dropped"] += 1
            wanted = {r["tap"] for r in self._rows("vmnets")} | {
                r["bridge"] for r in self._rows("nets")
            }
            for name in links.our_links(link_prefixes(self.key)):
                if name not in wanted:
                    links.remove_link(name)
                    counts["links_reaped"] += 1
            for r in self._rows("nets"):
                net = EnvNet(r["env"], r["bridge"], ipaddress.IPv4Network(r["subnet"]))
                links.ensure_bridge(
                    net.bridge, ipaddress.IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}")
                )
                self._localnet(net.bridge)
            counts.update(self.egress.reconcile(self._rows("nets")))
            self.apply()
        log.info("network reconciled: %s", counts)
        return counts

    def teardown(self) -> None:
        with self.lock:
            self.egress.teardown()
            for r in self._rows("vmnets"):
                with contextlib.suppress(TTError):
                    links.remove_link(r["tap"])
            for r in self._rows("nets"):
                with contextlib.suppress(TTError):
                    links.remove_link(r["bridge"])
            with self.store.lock:
                for t in ("ports", "vmnets", "nets"):
                    self.store.db.table(t).delete_where()
            self.apply()

    def _rows(
        self, table: str, where: str | None = None, args: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table(table).rows_where(where, args or []))


@contextlib.contextmanager
def _forward_record() -> Iterator[Path]:
    """The file holding ip_forward's value from before any hostd of this namespace, locked."""
    ns = os.stat("/proc/self/ns/net").st_ino
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / f"ip_forward-{ns}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield RUN_DIR / f"ip_forward-{ns}.before"


def _bound(port: int, proto: str) -> bool:
    """Is something on this host already listening on port?"""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 (a probe, closed at once)
        except OSError:
            return True
    return False
