"""`tt-hostd serve`: the host daemon (successor of TT's ttserver).

HTTPS with --tls-cert/--tls-key (ttci/infra/web_server.py; the joiner then advertises an https
URL); --ca verifies an https --join scheduler."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import socket
from pathlib import Path

from hostd.images.fetcher import Fetcher, PoolSource
from hostd.net.dns import upstreams
from hostd.net.manager import NetConfig
from hostd.service.api import create_app, host_info
from hostd.service.joiner import Joiner
from hostd.storage.volumes import make_backend
from hostd.vm.engine import Engine
from hostd.vm.libvirtd import PrivateLibvirtd, become_subreaper
from hostd.vm.manager import HostConfig, VMManager
from ttci.client.failover import split_servers
from ttci.infra.db import private_dir
from ttci.infra.proc import need
from ttci.infra.settings import add_settings, parse_hostport
from ttci.infra.tls import TLSFiles, base_url, check_ca, tls_files
from ttci.infra.web_server import make_server
from ttci.model.egress import parse_egress
from ttci.model.errors import BadInput
from ttci.model.resources import Resources

__all__ = ["cmd_serve", "default_total", "register"]

log = logging.getLogger("hostd.service.serve")


def default_total(state_dir: Path) -> Resources:
    """2 vCPUs per core (CI guests idle a lot), 80 % of memory, 80 % of free disk."""
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    probe = state_dir if state_dir.exists() else Path("/")
    disk = shutil.disk_usage(probe).free
    return Resources((os.cpu_count() or 1) * 2, int(mem_kib * 0.8 / 1024), int(disk * 0.8 / 2**30))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the host daemon (its API is used by the scheduler)")
    add_settings(s, "tt-hostd serve")  # run_cli resolves them: flag > env > file > default
    s.set_defaults(func=cmd_serve)


def _join_urls(join: str, ca: Path | None) -> tuple[str, ...]:
    """--join's scheduler replicas (ADDR:PORT[,ADDR:PORT...]) as URLs: the scheme as each
    says, else https when --ca is given."""
    urls = []
    for one in split_servers(join) or (join,):
        shost, sport = parse_hostport(one, "--join")
        urls.append(f"{base_url(one, ca).partition('://')[0]}://{shost}:{sport}")
    return tuple(urls)


def _join_args(
    args: argparse.Namespace, host: str, port: int, tls: TLSFiles | None
) -> tuple[tuple[str, ...], str, str, str, str] | None:
    """(scheduler urls, join token, host id, advertised url, host token), checked up front.
    Ours: https with our own certificate."""
    if not args.join:
        return None
    if not args.join_token:
        raise BadInput("--join needs --join-token", hint="or set TT_JOIN_TOKEN")
    urls = _join_urls(args.join, args.ca)
    ahost, aport = parse_hostport(args.advertise, "--advertise") if args.advertise else (host, port)
    if ahost in ("0.0.0.0", "::", "") or aport == 0:  # noqa: S104 (refusing it)
        raise BadInput(
            f"cannot advertise {ahost}:{aport} to the scheduler",
            hint="pass --advertise ADDR:PORT with an address the scheduler can reach",
        )
    return (
        urls,
        args.join_token,
        args.host_id,
        f"{'https' if tls else 'http'}://{ahost}:{aport}",
        args.token,
    )


def _net_config(args: argparse.Namespace, listen_host: str) -> NetConfig:
    lo, sep, hi = args.port_range.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit()):
        raise BadInput(f"--port-range {args.port_range!r} is not LOW-HIGH", hint="e.g. 20000-29999")
    public = args.public_addr
    if not public:
        public = parse_hostport(args.advertise, "--advertise")[0] if args.advertise else listen_host
    protected = [a.strip() for a in (args.protect or "").split(",") if a.strip()]
    if args.join:
        protected += [parse_hostport(one, "--join")[0] for one in split_servers(args.join)]
    for addr in protected:
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise BadInput(
                f"--protect/--join address {addr!r} is not an IPv4 address",
                hint="name control-plane hosts by address, e.g. --protect 10.0.0.5",
            ) from None
    try:
        dns = upstreams(args.dns)
    except ValueError as e:
        raise BadInput(
            f"--dns {args.dns!r} is not host, none or a list of ADDR[:PORT]: {e}",
            hint="e.g. --dns 10.0.0.53 (or TT_HOSTD_DNS)",
        ) from None
    return NetConfig(
        dns=dns,
        egress_default=parse_egress(args.allow_egress),
        protected=tuple(dict.fromkeys(protected)),
        pool=args.vm_net_pool,
        outgoing=args.outgoing == "allow",
        port_range=(int(lo), int(hi)),
        public_addr=public,
    )


def _totals(args: argparse.Namespace, state_dir: Path) -> Resources:
    dflt = default_total(state_dir)
    total = Resources(
        args.cpu_total or dflt.cpus,
        args.mem_total or dflt.memory_mib,
        args.disk_total or dflt.disk_gib,
    )
    if total.cpus <= 0 or total.memory_mib <= 0 or total.disk_gib <= 0:
        raise BadInput(f"totals must be positive, got {total.text()}", hint="fix --*-total")
    return total


def _start_fetcher(args: argparse.Namespace, joiner: Joiner, ca: Path | None) -> Fetcher:
    """Pull the pool's images this host lacks (--fetch-images; an admin's push even with
    `none`), through the scheduler, as this host; each new one is reported at once."""
    if args.fetch_rate < 0:
        raise BadInput(f"--fetch-rate {args.fetch_rate} is negative", hint="0 means no cap")
    source = PoolSource(joiner.url, joiner.host_id, joiner.host_token, str(ca) if ca else True)

    def follow(url: str) -> None:  # images come from the replica the heartbeats reach
        source.url, source.where = url, f"the scheduler at {url}"

    joiner.on_move = follow
    fetcher = Fetcher(
        args.image_path,
        source,
        want=args.fetch_images.strip().lower(),
        rate=args.fetch_rate * (1 << 20),
        on_added=joiner.beat,
    )
    fetcher.start()
    return fetcher


def _host_ready(args: argparse.Namespace, net: NetConfig) -> None:
    """Say what the host lacks before anything starts: tools, the storage backend."""
    need("nft")  # VM networking
    if net.dns and net.outgoing:
        need("dnsmasq")  # the ENVs' DNS forwarders
    make_backend(args.storage).check()  # before a private libvirtd: it must see ZFS's mounts


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.token:
        raise BadInput("hostd needs a token", hint="pass --token or set TT_HOSTD_TOKEN")
    args.host_id = args.host_id or socket.gethostname().split(".")[0].lower()
    host, port = parse_hostport(args.listen, "--listen")
    state_dir: Path = args.state_dir
    private_dir(state_dir)  # 0700: the database holds the VMs' agent tokens
    total = _totals(args, state_dir)
    tls = tls_files(args.tls_cert, args.tls_key)
    ca = check_ca(args.ca, "--ca") if args.ca else None
    joiner_args = _join_args(args, host, port, tls)
    net = _net_config(args, host)
    _host_ready(args, net)
    libvirtd = None
    uri = args.libvirt_uri
    become_subreaper()
    if args.private_libvirtd:
        libvirtd = PrivateLibvirtd(state_dir / "libvirt")
        libvirtd.start()
        uri = libvirtd.uri
    engine = Engine(uri)
    mgr = None
    try:
        log.info("engine: %s", engine.check())
        where = (args.host_id, args.image_path, state_dir, total, net, args.warm, args.storage)
        cfg = HostConfig(*where, cache_bytes=args.cache_size << 20)
        mgr = VMManager(cfg, engine)
        mgr.reconcile()
        app = create_app(mgr, args.token, max_files=args.max_files << 20)
        server = make_server(
            app, host, port, name="tt-hostd", tls=tls, threads=32, idle_timeout=3600
        )
        if joiner_args:
            manager = mgr
            sched_url, join_token, hid, adv, htoken = joiner_args
            joiner = Joiner(
                scheduler=sched_url,
                join_token=join_token,
                host_id=hid,
                advertise_url=adv,
                host_token=htoken,
                info=lambda: host_info(manager),
                ca=ca,
            )
            joiner.start()
            app.config["JOINER"] = joiner  # /readyz: has the scheduler answered lately?
            app.config["FETCHER"] = _start_fetcher(args, joiner, ca)
        log.info("tt-hostd %s serving on %s:%d (%s)", args.host_id, host, port, total.text())
        print(f"tt-hostd ready on {host}:{server.port}", flush=True)
        server.run()
    except KeyboardInterrupt:
        log.info("stopping%s", " (keeping VMs)" if args.keep_vms else "")
    finally:
        if mgr is not None:
            mgr.shutdown(keep_vms=args.keep_vms)
        if libvirtd is not None and not args.keep_vms:
            libvirtd.stop()
    return 0
