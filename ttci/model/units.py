"""VM sizes and durations as people write them, parsed in one place. Pure.

Every front end spells them the same way (`tt env add`, `tt job run`, the GitLab driver's flags
and its TT_CPUS/TT_MEMORY/TT_DISK job variables, the GitHub service's settings):

    --cpus N          vCPUs: 1, 2, 0.5
    --memory SIZE     MiB, or with a unit: 512, 512M, 2G, 2GiB, 1.5G
    --disk SIZE       GiB, or with a unit: 20, 20G, 1T, 20480M (0: the image's own size)
    DURATION          seconds, or with units: 90, 90s, 10m, 2h, 1d, 1.5h, 1h30m

Old spellings (`--cpu`, `--mem`) stay accepted with a deprecation note; OLD_FLAGS names them.
Ranges are the caller's: a parser here only turns text into a number.
"""

from __future__ import annotations

import math
import re

from ttci.model.errors import BadInput

__all__ = [
    "DISK_HINT",
    "DURATION_HINT",
    "MEMORY_HINT",
    "OLD_FLAGS",
    "deprecation",
    "parse_cpus",
    "parse_disk_gib",
    "parse_duration_s",
    "parse_memory_mib",
]

MEMORY_HINT = "write MiB, or a size with a unit, e.g. 2048 or 2G"
DISK_HINT = "write GiB, or a size with a unit, e.g. 20 or 20G"
DURATION_HINT = "write seconds, or with a unit, e.g. 90s, 10m, 2h, 1d"
# Old flag -> the one spelling (tt env add, tt job run, tt-github-webhooks serve).
OLD_FLAGS = {"--cpu": "--cpus", "--mem": "--memory"}

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.IGNORECASE)
_DURATION_RE = re.compile(r"\s*(?:\d+(?:\.\d+)?\s*[smhd]\s*)+", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\s*\d+(?:\.\d+)?\s*")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAMES = {20: "MiB", 30: "GiB"}


def deprecation(old: str, new: str) -> str:
    """The note printed (to stderr, or the log) when an old spelling is used."""
    return f"{old} is deprecated and will go away; write {new}"


def _number(value: str | float, what: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadInput(f"{what} {value!r} is not a number", hint=hint)
    if isinstance(value, str):
        if not _NUMBER_RE.fullmatch(value):
            raise BadInput(f"{what} {value!r} is not a number", hint=hint)
        value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"{what} {value!r} is not a number", hint=hint)
    return float(value)


def parse_cpus(value: str | float, what: str = "--cpus") -> float:
    """vCPUs: a number (0.5 is half a CPU's time). BadInput names `what`."""
    return _number(value, what, "write a number of vCPUs, e.g. 2")


def _size(value: str | int, what: str, unit_shift: int, hint: str) -> int:
    """Text (a bare number is in the unit) -> whole units, or BadInput."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise BadInput(f"{what} {value!r} is not a size", hint=hint)
    shift = _SHIFT[m[2].lower()] if m[2] else unit_shift
    nbytes = float(m[1]) * (1 << shift)
    units = nbytes / (1 << unit_shift)
    if not math.isfinite(units) or units != int(units):
        raise BadInput(f"{what} {value!r} is not a whole number of {_NAMES[unit_shift]}", hint=hint)
    return int(units)


def parse_memory_mib(value: str | int, what: str = "--memory") -> int:
    """Memory: MiB (`2048`), or with a unit (`2G`, `512M`, `2GiB`, `1.5G`) -> MiB."""
    return _size(value, what, 20, MEMORY_HINT)


def parse_disk_gib(value: str | int, what: str = "--disk") -> int:
    """Disk: GiB (`20`), or with a unit (`20G`, `1T`, `20480M`) -> GiB."""
    return _size(value, what, 30, DISK_HINT)


def parse_duration_s(value: str | float, what: str = "duration") -> float:
    """A duration: seconds (a number), or text with units (`90s`, `10m`, `2h`, `1d`, `1h30m`).

    Raises:
        BadInput: `WHAT 'text' is not a duration`; the range is the caller's to check.
    """
    if isinstance(value, bool):
        raise BadInput(f"{what} {value!r} is not a duration", hint=DURATION_HINT)
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise BadInput(f"{what} {value!r} is not a duration", hint=DURATION_HINT)
        return float(value)
    if not isinstance(value, str):
        raise BadInput(f"{what} {value!r} is not a duration", hint=DURATION_HINT)
    if _NUMBER_RE.fullmatch(value):
        seconds = float(value)
    elif _DURATION_RE.fullmatch(value):
        seconds = sum(float(n) * _SECONDS[u.lower()] for n, u in _DURATION_PART.findall(value))
    else:
        raise BadInput(f"{what} {value!r} is not a duration", hint=DURATION_HINT)
    if not math.isfinite(seconds):
        raise BadInput(f"{what} {value!r} is not a duration", hint=DURATION_HINT)
    return seconds
