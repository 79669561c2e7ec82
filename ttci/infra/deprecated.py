"""Old spellings that still work: a flag renamed to the one spelling (ttci/model/units.py)
stores like its new name and says so on stderr; settings do the same for their old variable
and config-file key (ttci/infra/settings.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ttci.model.units import deprecation

__all__ = ["DeprecatedFlag"]


class DeprecatedFlag(argparse.Action):
    """`parser.add_argument("--mem", dest="memory", action=DeprecatedFlag, new="--memory",
    help=argparse.SUPPRESS)`: the old flag, hidden from --help, noted on stderr when used."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        old = option_string or self.option_strings[0]
        print(f"{parser.prog}: {deprecation(old, self.new)}", file=sys.stderr)
        setattr(namespace, self.dest, values)
