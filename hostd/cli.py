"""`tt-hostd`: the host daemon (`serve`) and the host's image tools."""

from __future__ import annotations

import argparse

from hostd import image_cli, serve
from ttci import __version__
from ttci.entry import run_cli


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tt-hostd", description="TT CI host daemon and host tools")
    p.add_argument("--version", action="version", version=f"tt-hostd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    image_cli.register(sub)
    serve.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), argv)
