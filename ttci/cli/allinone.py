"""`tt up`: the all-in-one local cloud. One hostd (with a private libvirtd) and one scheduler on
loopback, the client configured to use them; Ctrl-C stops both and removes every VM."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ttci.client import config
from ttci.infra.extras import require
from ttci.infra.proc import BASE_ENV, spawn, stop
from ttci.infra.settings import add_setting
from ttci.model.errors import TTError

__all__ = [
    "START_TIMEOUT_S",
    "STOP_GRACE_S",
    "Stack",
    "StartError",
    "cmd_up",
    "python_main",
    "register",
    "running",
]

log = logging.getLogger("ttci.cli.allinone")
START_TIMEOUT_S = 120


class StartError(TTError):
    """A service of the all-in-one cloud did not start."""


@dataclass
class Stack:
    scheduler: str  # ADDR:PORT
    hostd: str
    token: str  # the admin's API token
    state_dir: Path
    hostd_proc: subprocess.Popen[bytes]
    scheduler_proc: subprocess.Popen[bytes]


def _tls_var(name: str) -> bool:
    return name == "TT_CA_FILE" or "_TLS_" in name


def python_main(module: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _spawn(
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    name: str,
) -> subprocess.Popen[bytes]:
    """Start a service and wait for its "ready on" line; its stderr goes to log_path."""
    proc = spawn(argv, log_path=log_path, pipe_stdout=True, env=env, new_session=True)
    ready = threading.Event()

    def drain() -> None:
        with proc.stdout or open(os.devnull, "rb") as out:
            for line in out:
                if b"ready on" in line:
                    ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2500:]
                raise StartError(
                    f"{name} did not start; its log ({log_path}) ends:\n{tail}",
                    hint="fix what the log says, then run `tt up` again",
                )
    except BaseException:  # also Ctrl-C while waiting: the child is in its own session
        stop(proc, grace=STOP_GRACE_S)
        raise
    return proc


STOP_GRACE_S = 120  # a daemon's graceful stop (destroying its VMs) may take this long


def _hostd_argv(
    state_dir: Path,
    image_path: Path,
    *,
    hostd_listen: str,
    libvirt_uri: str | None,
    cpu_total: float | None,
    mem_total: int | None,
    allow_outgoing: bool,
) -> list[str]:
    hostd_argv = [
        *python_main("hostd.cli.main"),
        "serve",
        "--listen",
        hostd_listen,
        "--state-dir",
        str(state_dir / "hostd"),
        "--image-path",
        str(image_path),
        "--host-id",
        "local",
    ]
    hostd_argv += ["--libvirt-uri", libvirt_uri] if libvirt_uri else ["--private-libvirtd"]
    if cpu_total:
        hostd_argv += ["--cpu-total", str(cpu_total)]
    if mem_total:
        hostd_argv += ["--mem-total", str(mem_total)]
    # A local cloud's VMs reach nothing outside unless asked (docs/facts/networking.md).
    hostd_argv += ["--outgoing", "allow" if allow_outgoing else "deny"]
    return hostd_argv


@contextlib.contextmanager
def running(
    state_dir: Path,
    image_path: Path,
    *,
    scheduler_listen: str = "127.0.0.1:7400",
    hostd_listen: str = "127.0.0.1:7420",
    libvirt_uri: str | None = None,
    cpu_total: float | None = None,
    mem_total: int | None = None,
    allow_outgoing: bool = False,
) -> Iterator[Stack]:
    """Start hostd and the scheduler; stop both (destroying VMs) on exit."""
    for extra in ("host", "scheduler"):  # the daemons run from this install
        require(extra, "the all-in-one cloud (tt up, tt demo)")
    state_dir.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(24)
    hostd_token = secrets.token_urlsafe(24)
    env = {
        **BASE_ENV,
        # Plain HTTP on loopback: an operator's TLS settings (TT_CA_FILE, TT_*_TLS_*) stay out.
        **{k: v for k, v in os.environ.items() if k.startswith("TT_") and not _tls_var(k)},
        "TT_HOSTD_TOKEN": hostd_token,
        "TT_ADMIN_TOKEN": admin_token,
    }
    hostd_argv = _hostd_argv(
        state_dir,
        image_path,
        hostd_listen=hostd_listen,
        libvirt_uri=libvirt_uri,
        cpu_total=cpu_total,
        mem_total=mem_total,
        allow_outgoing=allow_outgoing,
    )
    hostd = _spawn(hostd_argv, env, state_dir / "hostd.log", "tt-hostd")
    try:
        sched = _spawn(
            [
                *python_main("ttci.scheduler.web.serve"),
                "--listen",
                scheduler_listen,
                "--server-set",
                f"local={hostd_listen}",
                "--state-dir",
                str(state_dir),
            ],
            env,
            state_dir / "scheduler.log",
            "tt-scheduler",
        )
        try:
            yield Stack(scheduler_listen, hostd_listen, admin_token, state_dir, hostd, sched)
        finally:
            stop(sched, grace=STOP_GRACE_S)
    finally:
        stop(hostd, grace=STOP_GRACE_S)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser("up", help="run the all-in-one local cloud (scheduler + hostd + libvirtd)")
    u.add_argument("--listen", default="127.0.0.1:7400", help="scheduler ADDR:PORT")
    u.add_argument("--hostd-listen", default="127.0.0.1:7420", help="hostd ADDR:PORT")
    u.add_argument("--libvirt-uri", help="use this libvirt instead of starting a private one")
    u.add_argument("--cpu-total", type=float, help="vCPUs to hand out (default 2 per core)")
    u.add_argument("--mem-total", type=int, help="MiB to hand out (default 80 %% of memory)")
    u.add_argument("--no-config", action="store_true", help="do not write the client config")
    u.add_argument(
        "--allow-outgoing",
        action="store_true",
        help="let VMs reach outside through NAT (default: they reach nothing but port maps)",
    )
    u.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line when the cloud is up (addresses, logs, config), nothing else "
        "on stdout",
    )
    add_setting(u, "state-dir")
    add_setting(u, "image-path")
    u.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    with running(
        args.state_dir,
        args.image_path,
        scheduler_listen=args.listen,
        hostd_listen=args.hostd_listen,
        libvirt_uri=args.libvirt_uri,
        cpu_total=args.cpu_total,
        mem_total=args.mem_total,
        allow_outgoing=args.allow_outgoing,
    ) as stack:
        path = None
        if not args.no_config:
            path = config.save(f"http://{stack.scheduler}", stack.token)  # even with TT_CA_FILE
            if not args.json:
                print(f"client configured in {path}")
        if args.json:
            up = {"scheduler": stack.scheduler, "hostd": stack.hostd, "logs": str(stack.state_dir)}
            print(json.dumps({**up, "config": str(path) if path else None}), flush=True)
        else:
            print(
                f"TT CI is up: scheduler {stack.scheduler}, hostd {stack.hostd}; logs in "
                f"{stack.state_dir}. Ctrl-C stops it and deletes every VM.",
                flush=True,
            )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...", file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0
