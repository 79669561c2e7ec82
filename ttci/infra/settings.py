"""Settings from one table: name, type, default, environment variable and help (drives the CLIs)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ttci.model.errors import BadInput

__all__ = ["SETTINGS", "Setting", "add_setting", "parse_hostport"]


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


def parse_hostport(text: str, flag: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`ADDR:PORT` (an `http://` prefix is allowed) -> (host, port), or BadInput naming flag."""
    host, sep, port = text.strip().removeprefix("http://").rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(
            f"{flag} {text!r} does not parse", hint="write ADDR:PORT, e.g. 127.0.0.1:7420"
        )
    return host or default_host, int(port)
