"""`tt config`, `tt status`, `tt env ...`, `tt image list`: thin layer over the scheduler API."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ttci.cli import env_wait
from ttci.cli.cache_cmd import add_cache_args, cache_of, cmd_env_del, register_env_del
from ttci.cli.egress_args import add_egress_args
from ttci.cli.env_files import cmd_env_get, cmd_env_push, register_files
from ttci.cli.size_args import add_size_args, vm_size
from ttci.cli.ssh_exec import ssh_events
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.egress import parse_egress
from ttci.model.errors import BadInput
from ttci.model.ports import parse_ports
from ttci.model.units import parse_duration_s
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest, ExitStatus
from ttci.wire.envs import EnvRequest, parse_duration

__all__ = [
    "cmd_config",
    "cmd_env_add",
    "cmd_env_del",
    "cmd_env_extend",
    "cmd_env_get",
    "cmd_env_list",
    "cmd_env_push",
    "cmd_env_run",
    "cmd_env_show",
    "cmd_status",
    "register",
]

out = Console(width=None if sys.stdout.isatty() else 160)
_print_lock = threading.Lock()


def _client() -> Client:
    return Client(config.load())


def _table(title: str, cols: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("config", help="set which scheduler to use (and the token)")
    c.add_argument(
        "--server", help="scheduler ADDR:PORT (replicas: ADDR:PORT,ADDR:PORT,..., tried in turn)"
    )
    c.add_argument(
        "--token",
        help="your API token; - reads it from stdin (keeps it out of the process list)",
    )
    c.add_argument(
        "--ca", metavar="PATH", help='CA (PEM) that verifies an https scheduler ("" removes it)'
    )
    c.add_argument("--json", action="store_true", help="print JSON (the token never shown)")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("status", help="the scheduler's state (--server: every host)")
    s.add_argument("--server", action="store_true", help="show every host")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    env = sub.add_parser(
        "env", help="ENVs: groups of fresh VMs (add/list/show/run/push/get/extend/del)"
    )
    es = env.add_subparsers(dest="env_cmd", required=True, metavar="VERB")
    _register_add(es)
    ls = es.add_parser("list", help="list your ENVs")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_env_list)

    sh = es.add_parser("show", help="show an ENV and its VMs")
    sh.add_argument("name", help="ENV name")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_env_show)
    _register_run(es)
    register_files(es)

    x = es.add_parser("extend", help="let an ENV live longer: LIFE-TIME from now")
    x.add_argument("name", help="ENV name")
    x.add_argument(
        "--life-time",
        required=True,
        metavar="DURATION",
        help="it is deleted this long from now (never sooner than before), e.g. 1h, 90m",
    )
    x.add_argument("--json", action="store_true", help="print the ENV as JSON")
    x.set_defaults(func=cmd_env_extend)

    register_env_del(es)


def _register_add(es: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = es.add_parser("add", help="create an ENV of fresh VMs chosen by OS prefix")
    a.add_argument("name", help="ENV name (lowercase letters, digits, dashes)")
    a.add_argument(
        "--os-prefix",
        required=True,
        help="comma separated image prefixes, e.g. debian-12,qemu:debian-13:arm64",
    )
    add_size_args(a, "per VM", memory_default=512)
    a.add_argument("--dup-each", type=int, default=1, help="VMs per matching image (default 1)")
    a.add_argument(
        "--life-time",
        default="1h",
        metavar="DURATION",
        help="deleted after this long, e.g. 90m, 2h (default 1h)",
    )
    a.add_argument(
        "--vm-port",
        help="VM ports to reach from outside, e.g. 22,8080,53/udp (host ports are chosen and "
        "shown by `tt env show`)",
    )
    a.add_argument(
        "--dry-run",
        action="store_true",
        help="only say how many VMs would go to which host; create nothing",
    )
    a.add_argument(
        "--deny-outgoing",
        action="store_true",
        help="the VMs may not open connections outside their ENV",
    )
    a.add_argument(
        "--cold",
        action="store_true",
        help="boot every VM cold (default: restored from a snapshot template where a host has "
        "one: sooner, same result)",
    )
    add_egress_args(a)
    add_cache_args(a)
    w = a.add_mutually_exclusive_group()
    w.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if the cloud cannot start it now (default: wait in the queue, "
        "showing the position; Ctrl-C withdraws the request)",
    )
    w.add_argument(
        "--max-wait",
        metavar="DURATION",
        help="give up after waiting this long in the queue, e.g. 90s, 10m, 2h "
        "(default: as long as it takes)",
    )
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_env_add)


def _register_run(es: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = es.add_parser("run", help="run a command on every VM of an ENV at once")
    r.add_argument("name", help="ENV name")
    r.add_argument("--cmd", required=True, help="shell command to run (/bin/sh -c)")
    r.add_argument(
        "--timeout",
        metavar="DURATION",
        help="kill the command after this long, e.g. 90s, 10m (a bare number: seconds)",
    )
    r.add_argument(
        "--json", action="store_true", help="print one JSON event per line (NDJSON), only that"
    )
    r.add_argument(
        "--vm", action="append", help="run only on this VM (repeatable; default: every VM)"
    )
    r.add_argument(
        "--use-ssh",
        action="store_true",
        help="go through each VM's port map for 22 with ssh instead of the agent "
        "(the ENV needs --vm-port 22 and an image with sshd)",
    )
    r.add_argument("--ssh-key", type=Path, help="private key for --use-ssh (default: ssh's own)")
    r.add_argument("--ssh-user", default="root", help="user for --use-ssh (default root)")
    r.set_defaults(func=cmd_env_run)


def cmd_config(args: argparse.Namespace) -> int:
    if args.server is None and args.token is None and args.ca is None:
        cfg = config.load()
        if args.json:
            shown: dict[str, object] = {"server": cfg.server, "url": cfg.url}
            shown.update(urls=list(cfg.urls), token=bool(cfg.token))
            print(json.dumps({**shown, "ca": str(cfg.ca) if cfg.ca else None}, indent=2))
            return 0
        print(f"server: {cfg.server}\ntoken: {'set' if cfg.token else 'not set'}")
        print(f"url: {', '.join(cfg.urls)}" + (f" (CA {cfg.ca})" if cfg.ca else ""))
        return 0
    from_stdin = args.token == "-"  # noqa: S105 (the stdin marker, no password)
    token = sys.stdin.readline().strip() if from_stdin else args.token
    path = config.save(args.server, token, args.ca)
    print(json.dumps({"saved": str(path)}) if args.json else f"saved {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    c = _client()
    if args.server:
        hosts = c.get("/v1/hosts")
        if args.json:
            print(json.dumps(hosts, indent=2))
            return 0
        rows = []
        for h in hosts:
            total, used = h.get("total", {}), h.get("used", {})
            rows.append(
                [
                    h["id"],
                    h["state"] + (", drained" if h.get("drained") else ""),
                    h.get("kind", "static"),
                    h.get("machine", "?"),
                    f"{used.get('cpus', 0):g}/{total.get('cpus', 0):g}",
                    f"{used.get('memory_mib', 0)}/{total.get('memory_mib', 0)}",
                    f"{used.get('disk_gib', 0)}/{total.get('disk_gib', 0)}",
                    h.get("accel", "?"),
                    h.get("vms", 0),
                    len(h.get("images", [])),
                    h.get("error", ""),
                ]
            )
        _table(
            "hosts",
            [
                "host",
                "state",
                "joined",
                "arch",
                "CPU used",
                "MiB used",
                "GiB used",
                "accel",
                "VMs",
                "images",
                "error",
            ],
            rows,
        )
        return 0
    st = c.status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(
            f"scheduler {c.cfg.server} (tt {st['version']}), user {st['user']}"
            f"{' (admin)' if st['admin'] else ''}: {st['hosts_up']}/{st['hosts']} hosts up, "
            f"{st['envs']} ENVs, {st['vms']} VMs"
        )
    return 0


def _show_env(env: dict[str, Any]) -> None:
    out.print(
        f"ENV [bold]{env['name']}[/bold] ({env['state']}), owner {env['owner']}, "
        f"prefix {env['os_prefix']!r}, expires {env['expires_at']}",
        highlight=False,
    )
    if waiting := env_wait.queue_lines(env):
        for line in waiting:
            out.print(f"  {line}", highlight=False)
        return  # no VMs yet
    _table(
        f"{env['vm_count']} VMs",
        [
            "VM",
            "image",
            "host",
            "state",
            "accel",
            "CPU",
            "MiB",
            "GiB",
            "boot",
            "IP",
            "ports",
            "error",
        ],
        [
            [
                v["name"],
                v["image"],
                v["host"],
                v["state"],
                v["accel"],
                f"{v['cpus']:g}",
                v["memory_mib"],
                v["disk_gib"],
                f"{v['boot_s']:.1f} s",
                v.get("ip", ""),
                " ".join(
                    f"{p['host']}:{p['host_port']}->{p['vm_port']}"
                    + ("/udp" if p["proto"] == "udp" else "")
                    for p in v.get("ports", [])
                ),
                v["error"],
            ]
            for v in env.get("vms", [])
        ],
    )
    if eg := env.get("egress"):
        _show_egress(eg)


def _show_egress(eg: dict[str, Any]) -> None:
    """The ENV's allow-list and what it denied (audit: would have denied)."""
    verb = "would have denied" if eg["mode"] == "audit" else "denied"
    out.print(
        f"egress: {eg['mode']}, allowed {', '.join(eg['allow']) or 'nothing'}; "
        f"{verb} {eg['denied']} connection(s)",
        highlight=False,
    )
    for b in eg.get("blocked", [])[:20]:
        names = f"{'/'.join(b['names'])} " if b.get("names") else ""
        out.print(f"  {verb}: {names}{b['addr']}:{b['port']}/{b['proto']}", highlight=False)


def cmd_env_add(args: argparse.Namespace) -> int:
    cpus, memory_mib, disk_gib = vm_size(args)
    req = EnvRequest(
        name=args.name,
        os_prefix=args.os_prefix,
        cpus=cpus,
        memory_mib=memory_mib,
        disk_gib=disk_gib,
        dup_each=args.dup_each,
        life_s=parse_duration(args.life_time),
        deny_outgoing=args.deny_outgoing,
        vm_ports=tuple(parse_ports(args.vm_port or "")),
        allow_egress=parse_egress(args.allow_egress),
        egress_audit=args.egress_audit,
        cold=args.cold,
        cache=cache_of(args),
    )
    req.validate()
    opts = env_wait.wait_options(args.no_wait, args.max_wait)
    t0 = time.monotonic()
    c = _client()
    if args.dry_run:
        plan = c.plan_env(req)
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            hosts = ", ".join(f"{h}: {n}" for h, n in sorted(plan["hosts"].items()))
            print(f"ENV {plan['name']} would place {plan['vm_count']} VMs ({hosts})")
        return 0
    existed = env_wait.exists(c, req.name)  # the scheduler refuses the name: nothing to take back
    try:
        if args.json:
            env = c.create_env(req, wait=opts)
        else:
            env = env_wait.Live(out, req.name, t0).create(c, req, opts)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: leave nothing queued or booting behind
        if not existed:
            env_wait.withdraw(c, req.name)
        raise
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        _show_env(env)
        print(f"ready in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_env_list(args: argparse.Namespace) -> int:
    envs = _client().get("/v1/envs")
    if args.json:
        print(json.dumps(envs, indent=2))
        return 0
    _table(
        "ENVs",
        ["name", "owner", "state", "VMs", "lost", "prefix", "expires"],
        [
            [
                e["name"],
                e["owner"],
                env_wait.state_text(e),
                e["vm_count"],
                e["lost"],
                e["os_prefix"],
                e["expires_at"],
            ]
            for e in envs
        ],
    )
    return 0


def cmd_env_show(args: argparse.Namespace) -> int:
    env = _client().get(f"/v1/envs/{args.name}")
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        _show_env(env)
    return 0


def _timeout(text: str | None) -> float | None:
    """`tt env run --timeout DURATION` (a bare number: seconds, as before); None: no limit."""
    if text is None:
        return None
    seconds = parse_duration_s(text, "--timeout")
    if not 0 < seconds <= 30 * 86400:
        raise BadInput(f"--timeout {text!r} is outside 0 .. 30 days", hint="e.g. 90s or 10m")
    return seconds


def cmd_env_run(args: argparse.Namespace) -> int:
    timeout = _timeout(args.timeout)
    req = ExecRequest.shell(args.cmd, timeout=timeout, vms=tuple(args.vm) if args.vm else None)
    client = _client()
    env_vms = client.get(f"/v1/envs/{args.name}")["vms"]
    vms = [v["name"] for v in env_vms if not args.vm or v["name"] in args.vm]
    events = (
        ssh_events(env_vms, vms, args.cmd, user=args.ssh_user, key=args.ssh_key, timeout=timeout)
        if args.use_ssh
        else client.exec(args.name, req)
    )
    results = _print_events(events, as_json=args.json)
    for vm in vms:
        results.setdefault(vm, "no result (the command's stream ended early)")
    failed = [vm for vm, r in results.items() if r != "ok"]
    if not args.json:
        _table("result", ["VM", "result"], [[vm, r] for vm, r in sorted(results.items())])
        print(f"{len(results) - len(failed)}/{len(results)} VMs succeeded")
    return 1 if failed or not results else 0


def _print_events(events: Iterable[ExecEvent], as_json: bool) -> dict[str, str]:
    """Print a command's output line by line, prefixed with the VM; returns each VM's result."""
    results: dict[str, str] = {}
    partial: dict[tuple[str, EventKind], bytes] = {}
    streams = {EventKind.STDOUT: sys.stdout, EventKind.STDERR: sys.stderr}
    for ev in events:
        if as_json:
            print(json.dumps(ev.to_dict()), flush=True)
        vm = ev.vm or "?"
        if ev.kind in streams:
            *lines, partial[(vm, ev.kind)] = (partial.get((vm, ev.kind), b"") + ev.data).split(
                b"\n"
            )
            if not as_json:
                for line in lines:
                    print(f"[{vm}] {line.decode(errors='replace')}", file=streams[ev.kind])
                streams[ev.kind].flush()
        elif ev.status is not None:
            results[vm] = _exit_word(ev.status)
        elif ev.kind is EventKind.ERROR:
            results[vm] = f"error: {ev.message}" + (" (VM lost)" if ev.lost else "")
    if not as_json:
        for (vm, kind), rest in partial.items():
            if rest:
                print(f"[{vm}] {rest.decode(errors='replace')}", file=streams[kind])
    return results


def _exit_word(st: ExitStatus) -> str:
    if st.timed_out:
        return "timed out"
    if st.signal:
        return f"killed by signal {st.signal}"
    return "ok" if st.code == 0 else f"exit {st.code}"


def cmd_env_extend(args: argparse.Namespace) -> int:
    life_s = parse_duration(args.life_time)  # refused here, before the scheduler is asked
    env = _client().extend_env(args.name, f"{life_s}s")
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print(f"ENV {env['name']} now expires at {env['expires_at']}")
    return 0
