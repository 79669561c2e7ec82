"""`tt-scheduler`: the scheduler service (successor of TT's ttproxy).

HTTPS with --tls-cert/--tls-key (ttci/infra/web_server.py); --ca verifies https hosts."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from ttci import __version__
from ttci.infra.db import private_dir
from ttci.infra.entry import run_cli
from ttci.infra.settings import add_settings, parse_hostport
from ttci.infra.tls import TLSFiles, check_ca, tls_files
from ttci.infra.web_server import make_server
from ttci.model.errors import BadInput
from ttci.scheduler.hostd_client import HostdClient
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app

__all__ = ["main", "make_parser", "parse_server_set", "serve"]

log = logging.getLogger("ttci.scheduler.web.serve")


def parse_server_set(text: str, token: str, https: bool = False) -> dict[str, tuple[str, str]]:
    """`ADDR:PORT,ADDR:PORT` or `id=ADDR:PORT,...` -> host id -> (url, token). An entry may
    say `http://` or `https://`; a bare one is https when `https` (a CA is configured)."""
    out: dict[str, tuple[str, str]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        hid, sep, addr = item.rpartition("=")
        host, port = parse_hostport(addr, "--server-set entry", default_host="")
        if not host:
            raise BadInput(
                f"--server-set entry {item!r} names no address",
                hint="write ADDR:PORT or ID=ADDR:PORT, comma separated",
            )
        given = addr.strip()
        tls = given.startswith("https://") or (https and not given.startswith("http://"))
        scheme = "https" if tls else "http"
        out[hid if sep else f"{host}:{port}"] = (f"{scheme}://{host}:{port}", token)
    if not out:
        raise BadInput("--server-set names no host", hint="e.g. --server-set 10.0.0.2:7420")
    return out


def serve(
    scheduler: Scheduler, listen: str, tls: TLSFiles | None = None, max_files: int = 1 << 30
) -> None:
    host, port = parse_hostport(listen, "--listen")
    app = create_app(scheduler, max_files)
    server = make_server(
        app,
        host,
        port,
        name="tt-scheduler",
        tls=tls,
        # Every waiting ENV request's progress stream and every running exec stream holds a
        # worker for its whole life: enough that a busy cloud never starves the short calls
        # (a DELETE that frees capacity must not queue behind the streams waiting for it).
        threads=256,
        connection_limit=1000,  # CI plugins, the admin page and streams hold connections
        idle_timeout=3600,
        engine="cheroot",  # many short concurrent reads: see ttci/infra/web_server.py
    )
    scheduler.leases.start()  # before recover: this replica is alive, its ENVs its own
    scheduler.recover()
    scheduler.refresh_hosts()
    scheduler.start_reaper()
    scheduler.start_monitor()
    scheduler.start_dispatcher()
    log.info("tt-scheduler %s on %s", __version__, server.url)
    print(f"tt-scheduler ready on {host}:{server.port}", flush=True)
    try:
        server.run()
    finally:
        scheduler.stop()
        server.close()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tt-scheduler", description="TT CI scheduler")
    p.add_argument("--version", action="version", version=f"tt-scheduler {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_settings(p, "tt-scheduler")  # run_cli resolves them: flag > env > file > default
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    if not args.admin_token:
        raise BadInput("the admin token is missing", hint="pass --admin-token or TT_ADMIN_TOKEN")
    if not args.server_set and not args.join_token:
        raise BadInput(
            "no hosts: neither --server-set nor --join-token is given",
            hint="list hostds with --server-set ADDR:PORT, or let them join with --join-token",
        )
    if args.server_set and not args.hostd_token:
        raise BadInput("static hosts need --hostd-token", hint="or set TT_HOSTD_TOKEN")
    if not 1 <= args.host_timeout <= 3600:
        raise BadInput(f"--host-timeout {args.host_timeout:g} is outside 1..3600 s", hint="e.g. 15")
    state: Path = private_dir(args.state_dir)  # 0700: hostd and user tokens live below
    tls = tls_files(args.tls_cert, args.tls_key)
    HostdClient.trust(check_ca(args.ca, "--ca") if args.ca else None)
    https = args.ca is not None
    static = parse_server_set(args.server_set, args.hostd_token, https) if args.server_set else {}
    sched = Scheduler(
        state / "scheduler",
        static,
        admin_token=args.admin_token,
        join_token=args.join_token,
        host_timeout=args.host_timeout,
        database=args.database,
        password_file=args.database_password_file,
    )
    log.info("state in %s", sched.store.url)  # the password masked
    with contextlib.suppress(KeyboardInterrupt):
        serve(sched, args.listen, tls, max_files=args.max_files << 20)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), argv if argv is not None else sys.argv[1:])
