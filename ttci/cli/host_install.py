"""`tt host install`: run this machine's TT CI daemons as systemd services, in one command.

Writes the units (ttci/cli/systemd/*.service, with this install's bin directory and the config
directory filled in), a config file per daemon (/etc/ttci/<program>.toml: keys are the flag
names) and the secrets they name (random tokens, 0600, never on a command line), then enables
and starts the units (`systemctl enable --now`) where systemd runs.

    tt host install --scheduler                     the first machine: scheduler + its hostd
    tt host install --join ADDR:7400 --join-token-file FILE --advertise ADDR:7420
                                                    any other host joins the pool
    tt host install --github ...                    also the GitHub webhook service

An existing config file is kept (--force writes it anew); units are always rewritten. Each
daemon starts from its config file alone: the unit's ExecStart is `PROGRAM --config-file FILE`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ttci.infra.extras import require
from ttci.infra.settings import parse_hostport
from ttci.model.errors import BadInput, TTError

__all__ = ["UNITS", "cmd_install", "config_texts", "register", "render_unit"]

UNITS = ("tt-scheduler", "tt-hostd", "tt-github-webhooks")
_HEAD = (
    "# {program}: written by `tt host install`. Keys are the flag names (`{help}`); a flag or\n"
    "# a TT_* variable beats this file. `{program} {sub}--config-file {path} --print-config`\n"
    "# shows every setting in force and where it came from.\n"
)


def register(hs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tt host install` (under `tt host`)."""
    p = hs.add_parser("install", help="run this machine's daemons as systemd services")
    role = p.add_argument_group("what this machine runs (hostd always)")
    role.add_argument("--scheduler", action="store_true", help="also the scheduler; hostd joins it")
    role.add_argument("--github", action="store_true", help="also the GitHub webhook service")
    role.add_argument(
        "--join", metavar="ADDR:PORT[,...]", help="the pool's scheduler (or its replicas) to join"
    )
    role.add_argument(
        "--join-token-file", type=Path, metavar="FILE", help="the pool's join token (with --join)"
    )
    net = p.add_argument_group("addresses")
    net.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        help="hostd's (default 0.0.0.0:7420 with --join, else 127.0.0.1:7420)",
    )
    net.add_argument(
        "--advertise", metavar="ADDR:PORT", help="where the scheduler reaches hostd (with --join)"
    )
    net.add_argument(
        "--scheduler-listen",
        default="127.0.0.1:7400",
        metavar="ADDR:PORT",
        help="the scheduler's (0.0.0.0:7400 lets other hosts join; default %(default)s)",
    )
    where = p.add_argument_group("where")
    where.add_argument("--etc", type=Path, default=Path("/etc/ttci"), help="config directory")
    where.add_argument(
        "--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="systemd unit directory"
    )
    where.add_argument(
        "--bin-dir", type=Path, help="where tt-hostd and the others are (default: this tt's)"
    )
    p.add_argument("--force", action="store_true", help="write config files anew (else kept)")
    p.add_argument("--no-enable", action="store_true", help="write the files; start nothing")
    p.add_argument(
        "--json",
        action="store_true",
        help="print only what was written and started as JSON (the words go to stderr)",
    )
    p.set_defaults(func=cmd_install)


def render_unit(program: str, bin_dir: Path, etc: Path) -> str:
    """A unit with this install's paths (the templates say @BIN@ and @ETC@)."""
    text = resources.files("ttci.cli").joinpath(f"systemd/{program}.service").read_text()
    return text.replace("@BIN@", str(bin_dir)).replace("@ETC@", str(etc))


def _bin_dir(given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    here = Path(sys.executable).parent  # a venv's scripts sit beside its python
    if (here / "tt-hostd").is_file():
        return here
    found = shutil.which("tt-hostd")
    if found is None:
        raise TTError("tt-hostd is not installed", hint="pip install 'ttci[host]', or --bin-dir")
    return Path(found).parent


def _secret(path: Path, text: str | None = None) -> Path:
    """A secret file (0600): `text`, or a random token if the file does not exist yet."""
    if text is None and path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write((secrets.token_urlsafe(32) if text is None else text.strip()) + "\n")
    return path


def _toml(values: dict[str, str]) -> str:
    return "".join(f'{key} = "{value}"\n' for key, value in values.items())


def config_texts(args: argparse.Namespace) -> dict[str, str]:
    """program -> its config file's text (the secrets' files are written here too)."""
    etc: Path = args.etc
    out: dict[str, str] = {}
    hostd = {"listen": args.listen, "token-file": str(_secret(etc / "hostd-token"))}
    if args.scheduler:
        port = parse_hostport(args.scheduler_listen, "--scheduler-listen")[1]
        out["tt-scheduler"] = _toml(
            {
                "listen": args.scheduler_listen,
                "admin-token-file": str(_secret(etc / "admin-token")),
                "join-token-file": str(_secret(etc / "join-token")),
            }
        )
        hostd |= {"join": f"127.0.0.1:{port}", "join-token-file": str(etc / "join-token")}
    else:
        token = args.join_token_file.read_text()
        hostd |= {"join": args.join, "join-token-file": str(_secret(etc / "join-token", token))}
    if args.advertise:
        hostd["advertise"] = args.advertise
    out["tt-hostd"] = _toml(hostd)
    if args.github:
        out["tt-github-webhooks"] = _toml(
            {
                "secret-file": str(etc / "github-webhook-secret"),
                "token-file": str(etc / "github-token"),
                "tt-config": str(etc / "github-scheduler.json"),
            }
        )
    return out


def _check(args: argparse.Namespace) -> None:
    if args.scheduler == bool(args.join):
        raise BadInput(
            "give --scheduler (this machine runs the pool) or --join ADDR:PORT (it joins one)",
            hint="the first machine: tt host install --scheduler",
        )
    if args.join:
        for one in args.join.split(","):  # scheduler replicas: ADDR:PORT,ADDR:PORT
            parse_hostport(one, "--join")
        if args.join_token_file is None or args.advertise is None:
            raise BadInput(
                "--join needs --join-token-file FILE and --advertise ADDR:PORT",
                hint="the token file is the scheduler's /etc/ttci/join-token; advertise the "
                "address the scheduler reaches this host at",
            )
        if not args.join_token_file.is_file():
            raise BadInput(f"--join-token-file {args.join_token_file} does not exist")
    args.listen = args.listen or ("0.0.0.0:7420" if args.join else "127.0.0.1:7420")
    require("host", "tt host install")
    if args.scheduler:
        require("scheduler", "tt host install --scheduler")
    if args.github:
        require("github", "tt host install --github")


def cmd_install(args: argparse.Namespace) -> int:
    if not args.json:
        _install(args)
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # --json: stdout holds the JSON alone
        done = _install(args)
    print(json.dumps(done, indent=2))
    return 0


def _install(args: argparse.Namespace) -> dict[str, list[str]]:
    """Write the config files, units and secrets; start the units. Returns the paths."""
    done: dict[str, list[str]] = {"configs": [], "kept": [], "units": []}
    _check(args)
    bin_dir, etc = _bin_dir(args.bin_dir), args.etc.resolve()
    args.etc = etc
    etc.mkdir(parents=True, exist_ok=True)
    units = []
    for program, text in config_texts(args).items():
        path = etc / f"{program}.toml"
        sub = "serve " if program != "tt-scheduler" else ""
        head = _HEAD.format(program=program, sub=sub, path=path, help=f"{program} {sub}--help")
        if path.exists() and not args.force:
            print(f"kept {path} (--force writes it anew)")
            done["kept"].append(str(path))
        else:
            path.write_text(head + text)
            print(f"wrote {path}")
            done["configs"].append(str(path))
        unit = args.unit_dir / f"{program}.service"
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(render_unit(program, bin_dir, etc))
        print(f"wrote {unit}")
        done["units"].append(str(unit))
        units.append(program)
    _enable(args, units)
    if args.scheduler:
        print(
            f"other hosts join with: tt host install --join ADDR:PORT --join-token-file FILE "
            f"--advertise THEIR_ADDR:7420 (FILE: a copy of {etc / 'join-token'}; the scheduler "
            f"listens on {args.scheduler_listen})"
        )
    return done


def _enable(args: argparse.Namespace, units: list[str]) -> None:
    etc: Path = args.etc
    start = [u for u in units if u != "tt-github-webhooks"]
    if "tt-github-webhooks" in units:
        print(
            f"tt-github-webhooks: put the webhook secret in {etc / 'github-webhook-secret'}, a "
            f"GitHub token in {etc / 'github-token'} (or set app-id and app-key-file), and the "
            f"scheduler in {etc / 'github-scheduler.json'} (tt config --server ADDR:PORT "
            "--token - with TT_CONFIG set to that file), then: systemctl enable --now "
            "tt-github-webhooks"
        )
    names = [f"{u}.service" for u in start]
    if args.no_enable or not Path("/run/systemd/system").is_dir():
        why = "--no-enable" if args.no_enable else "systemd does not run here"
        print(
            f"{why}: start them with systemctl daemon-reload && systemctl enable --now "
            + " ".join(names)
        )
        return
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", *names]):
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise TTError(f"{' '.join(argv)} failed: {r.stderr.strip()}", hint="journalctl -xe")
    print("started " + ", ".join(names) + " (systemctl status ...; GET /readyz says ready)")
