"""What every HTTP API of TT CI shares: the API version and the error body. Pure.

Every top-level request document carries `"api": API_VERSION`; a document without one is taken
as the current version (clients older than the field). A receiver accepts its own version and
the previous release's (API_VERSIONS): during an upgrade hosts and clients one release behind
keep working with an upgraded scheduler, which talks to each host at the host's version
(`at_version`; the host's report says it). Any other version is refused. docs/upgrading.md.
An error answer is `{"error": message, "hint": how to fix it, "kind": the error's class}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ttci.model.errors import ApiError, BadInput, TTError

__all__ = [
    "API_VERSION",
    "API_VERSIONS",
    "ApiVersionError",
    "ErrorBody",
    "api_error",
    "as_int",
    "as_number",
    "as_text",
    "at_version",
    "check_api",
    "require_object",
]

API_VERSION = 1
# Accepted from the other side: this version and the previous release's (none before 1).
API_VERSIONS = tuple(v for v in (API_VERSION - 1, API_VERSION) if v >= 1)


class ApiVersionError(TTError):
    """The other side speaks another API version (servers answer 403)."""


def require_object(d: Any, what: str) -> dict[str, Any]:
    """d itself, if it is a JSON object; BadInput naming what it should have been otherwise."""
    if not isinstance(d, dict):
        raise BadInput(f"{what} must be a JSON object, not {type(d).__name__}", hint="send {...}")
    return d


def as_number(v: Any, what: str) -> float:
    """v as a float, if it is a finite JSON number (not a boolean, not a string).

    Raises:
        TypeError: not a number. ValueError: NaN or infinite. (from_dict turns both into
        BadInput naming the document.)
    """
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{what} must be a number, not {_short(v)}")
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, not {v!r}")
    return float(v)


def as_int(v: Any, what: str) -> int:
    """v as an int, if it is a JSON integer (2.0 counts; booleans and strings do not)."""
    number = as_number(v, what)
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{what} must be a whole number, not {v!r}")
    return v if isinstance(v, int) else int(number)


def as_text(v: Any, what: str, max_len: int = 1000) -> str:
    """v, if it is a string of at most max_len characters."""
    if not isinstance(v, str):
        raise TypeError(f"{what} must be a string, not {_short(v)}")
    if len(v) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_api(d: dict[str, Any], what: str, *, required: bool = False) -> int:
    """The document's API version, if this side speaks it.

    Raises:
        ApiVersionError: another version (or none, when required).
    """
    version = d.get("api", None if required else API_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in API_VERSIONS:
        spoken = " and ".join(str(v) for v in API_VERSIONS)  # (True == 1 in Python)
        raise ApiVersionError(
            f"{what} speaks API version {version!r}; this side speaks {spoken}",
            hint="upgrade the scheduler first, then the hosts, then the clients "
            "(docs/upgrading.md)",
        )
    return version


def at_version(doc: Any, version: int | None) -> Any:
    """A request document as a peer of `version` reads it (the documents of the versions
    spoken are the same but for their number); anything else passes unchanged."""
    if version is None or not isinstance(doc, dict) or "api" not in doc:
        return doc
    return {**doc, "api": min(version, API_VERSION)}


@dataclass(frozen=True)
class ErrorBody:
    """An HTTP error answer of our services."""

    error: str
    hint: str | None = None
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.hint:
            out["hint"] = self.hint
        if self.kind:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorBody:
        hint = d.get("hint")
        return cls(
            error=str(d.get("error", "")),
            hint=str(hint) if hint else None,
            kind=str(d.get("kind") or ""),
        )

    @classmethod
    def decode(cls, raw: bytes | str, fallback: str = "") -> ErrorBody:
        """The body of an error answer; one that is no JSON object (a proxy's HTML page, an
        empty body) becomes its first 300 characters, or fallback (the HTTP reason)."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        try:
            d = json.loads(text)
        except ValueError:
            d = None
        if isinstance(d, dict) and "error" in d:
            return cls.from_dict(d)
        return cls(text[:300] or fallback or "no answer")

    def exception(self, status: int) -> TTError:
        """The error to raise for this answer: BadInput for a 400 (the caller's mistake),
        ApiError with the status for the rest."""
        if status == 400:
            return BadInput(self.error, hint=self.hint)
        return ApiError(self.error, hint=self.hint, status=status)


def api_error(status: int, raw: bytes | str, reason: str = "") -> TTError:
    """The TTError for an error answer of the scheduler (status >= 400, its raw body)."""
    return ErrorBody.decode(raw, reason).exception(status)
