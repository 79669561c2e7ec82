"""`tt`: the user's command line."""

from __future__ import annotations

import argparse

from hostd import image_cli
from runner_executor import register as gitlab_cli
from ttci import __version__, allinone, demo, env_cli, jobrun, pool_cli
from ttci.entry import run_cli


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tt", description="TT CI: fresh VMs for every CI job")
    p.add_argument("--version", action="version", version=f"tt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    image_cli.register(sub, pool=True)
    env_cli.register(sub)
    pool_cli.register(sub)
    jobrun.register(sub)
    allinone.register(sub)
    demo.register(sub)
    gitlab_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), argv)
