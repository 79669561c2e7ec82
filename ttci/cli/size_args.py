"""The VM size flags of `tt env add` and `tt job run`, spelled as everywhere else
(ttci/model/units.py): `--cpus N`, `--memory SIZE`, `--disk SIZE`. The old `--cpu`/`--mem` still
work, hidden from --help, with a deprecation note on stderr."""

from __future__ import annotations

import argparse

from ttci.infra.deprecated import DeprecatedFlag
from ttci.model.units import OLD_FLAGS, parse_cpus, parse_disk_gib, parse_memory_mib

__all__ = ["add_size_args", "vm_size"]


def add_size_args(p: argparse.ArgumentParser, each: str, memory_default: int) -> None:
    """`--cpus`, `--memory`, `--disk` (and the old `--cpu`, `--mem`); `each` says of what."""
    p.add_argument("--cpus", metavar="N", default="1", help=f"vCPUs {each} (default 1)")
    p.add_argument(
        "--memory",
        metavar="SIZE",
        default=str(memory_default),
        help=f"memory {each}: MiB, or e.g. 2G (default {memory_default})",
    )
    p.add_argument(
        "--disk",
        metavar="SIZE",
        default="0",
        help=f"disk {each}: GiB, or e.g. 20G (default: the image's size)",
    )
    for old, new in OLD_FLAGS.items():
        p.add_argument(
            old,
            dest=new.removeprefix("--"),
            action=DeprecatedFlag,
            new=new,
            metavar="N",
            help=argparse.SUPPRESS,
        )


def vm_size(args: argparse.Namespace) -> tuple[float, int, int]:
    """(cpus, memory MiB, disk GiB) from the flags (BadInput naming the flag)."""
    return parse_cpus(args.cpus), parse_memory_mib(args.memory), parse_disk_gib(args.disk)
