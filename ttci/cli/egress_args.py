"""`--allow-egress` and `--egress-audit`, the same for `tt env add` and `tt job run`."""

from __future__ import annotations

import argparse

__all__ = ["add_egress_args"]


def add_egress_args(p: argparse.ArgumentParser, what: str = "the VMs") -> None:
    p.add_argument(
        "--allow-egress",
        metavar="RULES",
        help=f"{what} may reach only these outside (a name resolves only if listed, and covers "
        "the names under it), e.g. 'gitlab.example.com,*.pypi.org,10.1.0.0/16:443'",
    )
    p.add_argument(
        "--egress-audit",
        action="store_true",
        help="block nothing, but count and name what --allow-egress would block "
        "(`tt env show` lists it)",
    )
