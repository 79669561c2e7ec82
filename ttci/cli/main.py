"""`tt`: the user's command line, the top floor.

Its own verbs live in this folder; verbs of the host and CI packages (`tt image ...` from hostd,
`tt gitlab ...` from runner_executor) are found through the `ttci.commands` entry points, so this
package never imports the packages built on top of it.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points

from ttci import __version__
from ttci.cli import allinone, cache_cmd, demo, env_cmd, job_cmd, pool_cmd, queue_cmd
from ttci.infra.entry import run_cli

__all__ = ["COMMAND_GROUP", "main", "make_parser"]

COMMAND_GROUP = "ttci.commands"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tt", description="TT CI: fresh VMs for every CI job")
    p.add_argument("--version", action="version", version=f"tt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in (
        env_cmd.register,
        pool_cmd.register,
        queue_cmd.register,
        job_cmd.register,
        allinone.register,
        demo.register,
        cache_cmd.register,
    ):
        register(sub)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), argv)
