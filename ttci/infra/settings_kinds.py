"""What a setting is: its Kind (how its text parses) and its Setting row; the rows themselves are
ttci/infra/settings_table.py (shared, scheduler, hostd) and settings_ci_rows.py (the CI plugins),
which daemon takes which is settings_programs.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttci.model.errors import BadInput
from ttci.model.units import parse_disk_gib, parse_duration_s, parse_memory_mib

__all__ = [
    "BOOL",
    "DISK",
    "DURATION",
    "FLOAT",
    "HOSTPORT",
    "HOSTPORTS",
    "INT",
    "LIST",
    "MEMORY",
    "PATH",
    "TEXT",
    "Kind",
    "Setting",
    "on",
    "split_hostport",
]


def split_hostport(text: str) -> tuple[str, int] | None:
    """`ADDR:PORT` (an `http://` or `https://` prefix is allowed) -> (host, port); None when it
    does not parse."""
    bare = text.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True)
class Kind:
    """How a setting's text parses; `parse` raises ValueError on text that is not `what`."""

    what: str
    example: str
    parse: Callable[[str], Any]
    metavar: str | None = None  # in --help; None: the flag's name in capitals


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _hostport(text: str) -> str:
    if split_hostport(text) is None:
        raise ValueError(text)
    return text


def _hostports(text: str) -> str:
    items = [x for x in text.split(",") if x.strip()]
    if not items or any(split_hostport(x) is None for x in items):
        raise ValueError(text)
    return text


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


TEXT = Kind("text", "x", str)
PATH = Kind("a path", "/path", Path, "PATH")
INT = Kind("a whole number", "1", int, "N")
FLOAT = Kind("a number", "1.5", float, "N")
BOOL = Kind("true or false", "true", _bool)
HOSTPORT = Kind("ADDR:PORT", "127.0.0.1:7400", _hostport, "ADDR:PORT")
HOSTPORTS = Kind("ADDR:PORT[,ADDR:PORT...]", "127.0.0.1:7400", _hostports, "ADDR:PORT[,...]")
LIST = Kind("a comma-separated list", "a,b", _list)  # a flag: repeated; a file: an array


def _units(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A ttci/model/units.py parser as a Kind's (ValueError on bad text)."""

    def run(text: str) -> Any:
        try:
            return parse(text)
        except BadInput:
            raise ValueError(text) from None

    return run


# VM sizes and durations, spelled as everywhere (ttci/model/units.py).
MEMORY = Kind("MiB or a size such as 2G", "1024", _units(parse_memory_mib), "SIZE")
DISK = Kind("GiB or a size such as 20G", "20", _units(parse_disk_gib), "SIZE")
DURATION = Kind("a duration such as 90s, 10m, 2h", "10m", _units(parse_duration_s), "DURATION")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    default: str | None  # as text; None: unset (optional, or the daemon works it out)
    help: str  # a secret's help is a noun phrase: errors say "cannot read {help} from PATH"
    flag: str | None = ""  # "" -> --NAME; None: no flag (environment, or a file via `file`)
    env: str = ""  # "" -> TT_NAME
    secret: bool = False  # never shown, never read from a config file
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    file: str | None = None  # a secret's setting naming a file that holds it (beats `env`)
    old: tuple[str, str] | None = None  # a renamed row's old (flag, variable): deprecated

    def __post_init__(self) -> None:
        if self.flag == "":
            object.__setattr__(self, "flag", "--" + self.name)
        if not self.env:
            object.__setattr__(self, "env", "TT_" + self.name.upper().replace("-", "_"))

    def parse(self, text: str, where: str) -> Any:
        """Text from `where` (a flag, a variable, a file key) -> value, or BadInput saying why."""
        shown = "(secret)" if self.secret else repr(text)
        if self.choices and text not in self.choices:
            raise BadInput(
                f"{where} {shown} is not one of {', '.join(self.choices)}",
                hint=self._fix(where, self.choices[0]),
            )
        try:
            return self.kind.parse(text)
        except ValueError:
            raise BadInput(
                f"{where} {shown} is not {self.kind.what}",
                hint=self._fix(where, self.default or self.kind.example),
            ) from None

    def _fix(self, where: str, example: str) -> str:
        if where.startswith("--"):
            return f"write {self.kind.what}, e.g. {where} {example}"
        if where == self.env:
            return f"write {self.kind.what}, e.g. {self.env}={example}"
        return f"write {self.kind.what}, e.g. {where.split(maxsplit=1)[0]} = {example!r}"


def on(prefix: str) -> Callable[..., Setting]:
    """Rows of one program: named PREFIX-FLAG (so TT_PREFIX_FLAG), flag --FLAG."""

    def row(flag: str, kind: Kind, default: str | None, help: str, **kw: Any) -> Setting:
        return Setting(f"{prefix}-{flag}", kind, default, help, flag="--" + flag, **kw)

    return row
