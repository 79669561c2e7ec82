"""Settings from one table: name, type, default, environment variable and help (drives the CLIs)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: str
    help: str

    @property
    def env(self) -> str:
        return "TT_" + self.name.upper().replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name

    def value(self) -> str:
        return os.environ.get(self.env, self.default)


SETTINGS = {
    s.name: s
    for s in (
        Setting("image-path", Path, "/var/lib/ttci/images", "where this host keeps its images"),
        Setting("cache-dir", Path, "/var/cache/ttci", "build cache (rootfs and kernel trees)"),
        Setting("state-dir", Path, "/var/lib/ttci/state", "hostd's state (SQLite, sockets)"),
        Setting("mirror", str, "http://deb.debian.org/debian", "Debian mirror for image builds"),
    )
}


def add_setting(parser: argparse.ArgumentParser, name: str) -> None:
    s = SETTINGS[name]
    parser.add_argument(
        s.flag,
        type=s.type,
        default=s.type(s.value()),
        help=f"{s.help} (env {s.env}, default {s.default})",
    )
