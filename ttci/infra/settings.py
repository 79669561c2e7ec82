"""Settings from one table: every daemon's flags, environment variables, help and config file.

The table is ttci/infra/settings_table.py (re-exported here): a row (`Setting`) is a setting's
name, kind (how its text parses), default, help, environment variable, flag and whether it is a
secret; `DAEMONS` lists which settings each daemon takes. `add_settings` puts
them on an argparse parser, with help naming the environment variable and the default; `resolve`
(run by `run_cli`, or by a daemon's own main) then fills each value in, first source that has one
wins: flag > environment > config file (`/etc/ttci/<program>.toml`, keys are the flag names) >
default. Bad text is a BadInput naming where it came from and how to fix it. Every daemon also
takes `--config-file PATH` (another file than /etc/ttci/<program>.toml) and `--print-config`
(the effective values as TOML, each with its source, secrets masked; then exit).

Secrets come from the environment, or from the file a `*-file` setting names; never from a config
file, and their values are never shown (help says "secret", `describe` masks them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ttci.infra.deprecated import DeprecatedFlag
from ttci.infra.settings_table import (
    BOOL,
    DAEMONS,
    FLOAT,
    HOSTPORT,
    INT,
    LIST,
    PATH,
    SETTINGS,
    TEXT,
    Kind,
    Setting,
    split_hostport,
)
from ttci.model.errors import BadInput, TTError
from ttci.model.units import deprecation

__all__ = [
    "BOOL",
    "DAEMONS",
    "ETC",
    "FLOAT",
    "HOSTPORT",
    "INT",
    "LIST",
    "PATH",
    "SETTINGS",
    "TEXT",
    "Kind",
    "Resolved",
    "Setting",
    "add_setting",
    "add_settings",
    "config_toml",
    "describe",
    "env_text",
    "parse_hostport",
    "resolve",
]

log = logging.getLogger("ttci.settings")
ETC = Path("/etc/ttci")  # <program>.toml here: the lowest source but the defaults
_MARK = "_setting:"  # namespace attributes add_settings leaves for resolve (and resolve removes)


def parse_hostport(text: str, flag: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`ADDR:PORT` (an `http://` prefix is allowed) -> (host, port), or BadInput naming flag."""
    hp = split_hostport(text)
    if hp is None:
        raise BadInput(
            f"{flag} {text!r} does not parse", hint="write ADDR:PORT, e.g. 127.0.0.1:7420"
        )
    return hp[0] or default_host, hp[1]


def env_text(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The setting's environment variable, or None when it is unset or empty."""
    return (os.environ if environ is None else environ).get(SETTINGS[name].env) or None


@dataclass(frozen=True)
class Resolved:
    setting: Setting
    dest: str  # the argparse attribute
    value: Any
    source: str  # "flag --x", "env TT_X", "file /etc/ttci/p.toml", "default"
    key: str | None = None  # its key in the config file (the flag's name); None: no flag


def _used(daemon: str) -> list[tuple[Setting, str | None]]:
    out = []
    for entry in DAEMONS[daemon]:
        name, flag = (entry, None) if isinstance(entry, str) else entry
        s = SETTINGS[name]
        out.append((s, flag or s.flag))
    return out


def _help(s: Setting) -> str:
    if s.secret:
        tail = f"env {s.env}; secret, never shown"
    elif s.default:
        tail = f"env {s.env}, default {s.default}"
    else:
        tail = f"env {s.env}"
    return f"{s.help} ({tail})".replace("%", "%%")


def _add(parser: argparse.ArgumentParser, s: Setting, flag: str | None, program: str) -> None:
    dest = (flag or s.name).removeprefix("--").replace("-", "_")
    parser.set_defaults(**{_MARK + dest: (s.name, flag, program)})
    if flag is None:
        return
    kw: dict[str, Any] = {"dest": dest, "default": None, "help": _help(s)}
    if s.kind is BOOL:
        kw["action"] = argparse.BooleanOptionalAction
    elif s.kind is LIST:
        kw["action"] = "append"
    if s.choices:
        kw["choices"] = s.choices
    if s.metavar or (s.kind.metavar and not s.choices):
        kw["metavar"] = s.metavar or s.kind.metavar
    parser.add_argument(flag, **kw)
    if s.old:  # the renamed row's old flag: still works, hidden, noted on stderr
        kw |= {"action": DeprecatedFlag, "new": flag, "help": argparse.SUPPRESS}
        parser.add_argument(s.old[0], **kw)


class _Formatter(argparse.HelpFormatter):
    """Keeps a path such as /etc/ttci/tt-hostd.toml whole when the epilog is wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


def add_settings(parser: argparse.ArgumentParser, daemon: str) -> None:
    """Add `daemon`'s settings (a DAEMONS key) to its parser; `resolve` fills them in."""
    program = daemon.split(maxsplit=1)[0]
    used = _used(daemon)
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = _Formatter
    for s, flag in used:
        _add(parser, s, flag, program)
    parser.add_argument(
        "--config-file",
        type=Path,
        metavar="PATH",
        help=f"read the settings from this TOML file (default {ETC}/{program}.toml)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (each with its source, secrets masked) and exit",
    )
    env_only = [_env_only_help(s) for s, flag in used if not flag]
    parser.epilog = (
        (f"From the environment only, never a flag: {'; '.join(env_only)}. " if env_only else "")
        + f"Each flag may also come from its environment variable or from {ETC}/{program}.toml "
        "(keys: the flag names; --config-file names another); a flag beats the environment, "
        "which beats the file."
    )


def _env_only_help(s: Setting) -> str:
    notes = (["secret"] if s.secret else []) + (
        [f"or the file {SETTINGS[s.file].flag} names"] if s.file else []
    )
    return f"{s.env}, {s.help}" + (f" ({'; '.join(notes)})" if notes else "")


def add_setting(parser: argparse.ArgumentParser, name: str) -> None:
    """Add one setting to a parser (no config file); `resolve` (run_cli runs it) fills it in."""
    s = SETTINGS[name]
    _add(parser, s, s.flag, "")


def _toml_text(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str | int | float):
        return str(value)
    raise BadInput(f"{where} is a {type(value).__name__}", hint="give a string, number or list")


def _file_keys(program: str) -> dict[str, Setting]:
    """Config file key (the flag name, no dashes) -> setting, over all the program's commands."""
    keys: dict[str, Setting] = {}
    for daemon in DAEMONS:
        if daemon.split()[0] == program:
            keys |= {f.removeprefix("--"): s for s, f in _used(daemon) if f}
            keys |= {s.old[0].removeprefix("--"): s for s, f in _used(daemon) if f and s.old}
    return keys


def _read_file(program: str, path: Path, named: bool = False) -> tuple[Path, dict[str, str]]:
    """The program's config file as flag name -> text; a missing file is empty unless it was
    `named` (--config-file)."""
    if named and not path.is_file():
        raise BadInput(f"--config-file {path} does not exist", hint="check the path")
    if not program or not path.is_file():
        return path, {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}", hint="fix the file (TOML) or remove it") from e
    keys = _file_keys(program)
    out = {}
    for raw, value in data.items():
        key = raw.replace("_", "-")
        s = keys.get(key)
        if s is None:
            raise BadInput(f"{path}: no setting {raw!r}", hint=f"known: {', '.join(sorted(keys))}")
        if s.secret:
            raise BadInput(
                f"{path}: {raw} is a secret, and secrets are not read from config files",
                hint=f"set {s.env} in the daemon's environment",
            )
        if s.old and key == s.old[0].removeprefix("--"):
            key = (s.flag or "").removeprefix("--")
            log.warning("%s: %s", path, deprecation(raw, key))
        out[key] = _toml_text(value, f"{raw} in {path}")
    return path, out


def _pick(
    s: Setting,
    given: Any,
    flag: str | None,
    environ: Mapping[str, str],
    file: tuple[Path, dict[str, str]],
) -> tuple[Any, str]:
    if given is not None and flag is not None:  # argparse leaves None when the flag is absent
        return (s.parse(given, flag) if isinstance(given, str) else given), f"flag {flag}"
    if environ.get(s.env):
        return s.parse(environ[s.env], s.env), f"env {s.env}"
    if s.old and environ.get(s.old[1]):
        log.warning("%s", deprecation(s.old[1], s.env))
        return s.parse(environ[s.old[1]], s.old[1]), f"env {s.old[1]}"
    key = (flag or "").removeprefix("--")
    if key in file[1]:
        return s.parse(file[1][key], f"{key} in {file[0]}"), f"file {file[0]}"
    if s.default is None:
        return None, "default"
    return s.parse(s.default, f"the default of {s.name}"), "default"


def _read_secret(s: Setting, path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise TTError(
            f"cannot read {s.help} from {path}: {e.strerror}",
            hint="check the path and its permissions",
        ) from e


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None, etc: Path | None = None
) -> list[Resolved]:
    """Fill in the settings `add_settings` put on the parser, source by source (idempotent)."""
    environ = os.environ if environ is None else environ
    files: dict[str, tuple[Path, dict[str, str]]] = {}
    out: list[Resolved] = []
    named: Path | None = getattr(args, "config_file", None)
    for key in [k for k in vars(args) if k.startswith(_MARK)]:
        name, flag, program = getattr(args, key)
        delattr(args, key)
        dest = key.removeprefix(_MARK)
        if program not in files:
            path = named or (ETC if etc is None else etc) / f"{program}.toml"
            files[program] = _read_file(program, path, named is not None)
        s = SETTINGS[name]
        value, source = _pick(s, getattr(args, dest, None), flag, environ, files[program])
        out.append(Resolved(s, dest, value, source, flag.removeprefix("--") if flag else None))
    by_name = {r.setting.name: r for r in out}
    for i, r in enumerate(out):
        holder = by_name.get(r.setting.file or "")
        if holder is not None and holder.value:  # the file beats the environment variable
            text = _read_secret(r.setting, Path(holder.value))
            out[i] = replace(r, value=text, source=f"file {holder.value}")
    for r in out:
        setattr(args, r.dest, r.value)
        if r.setting.secret and r.value and r.source.startswith("flag"):
            file = SETTINGS[r.setting.file].env if r.setting.file else ""
            log.warning(
                "%s is on the command line, where every local user can read it; use %s instead",
                r.source.removeprefix("flag "),
                r.setting.env + (f" or a file named by {file}" if file else ""),
            )
    if out:
        log.debug("settings: %s", "; ".join(describe(out)))
    if out and getattr(args, "print_config", False):
        print(config_toml(out, next(iter(files.values()))[0]), end="")
        raise SystemExit(0)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def config_toml(resolved: Sequence[Resolved], path: Path) -> str:
    """`--print-config`: the effective settings as a config file would hold them, each with
    its source; secrets (never read from a file) and unset values are comments."""
    lines = [f"# effective settings: flag > environment > {path} > default; secrets masked"]
    for r in resolved:
        name = r.key or r.setting.env
        unset = r.value is None or r.value in ("", [])
        if r.setting.secret:
            state = "unset" if unset else "set, ***"
            lines.append(f"# {name}: secret, {state} ({r.source})")
        elif unset:
            lines.append(f"# {name}: unset ({r.source})")
        elif r.key is None:
            lines.append(f"# {name} = {_toml_value(r.value)}  # {r.source}, not a file key")
        else:
            lines.append(f"{name} = {_toml_value(r.value)}  # {r.source}")
    return "\n".join(lines) + "\n"


def describe(resolved: Sequence[Resolved]) -> list[str]:
    """`name = value (source)` lines for a log, secrets masked."""
    lines = []
    for r in resolved:
        unset = r.value is None or r.value in ("", [])
        value = "(unset)" if unset else "***" if r.setting.secret else r.value
        lines.append(f"{r.setting.name} = {value} ({r.source})")
    return lines
