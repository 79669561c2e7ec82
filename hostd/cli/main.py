"""`tt-hostd`: the host daemon (`serve`) and the host's image tools."""

from __future__ import annotations

import argparse

from hostd.cli import image_cmd as image_cli
from hostd.service import serve
from ttci import __version__
from ttci.infra.entry import run_cli

__all__ = ["main", "make_parser"]


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
