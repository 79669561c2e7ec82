"""The admission queue on the wire. Pure.

A POST /v1/envs may wait for capacity: the body's `wait` (default true) and `max_wait`
(seconds or text like `30m`; absent: no limit) say whether and how long. While it waits, the
ENV shows `state: "queued"` and a `queue` object (QueueInfo); the progress stream sends a
`queued` event whenever that changes (and every few seconds), then `granted`, then the usual
`vm` events and `ready` or `error`. GET /v1/queue lists the waiting requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ttci.model.errors import BadInput
from ttci.model.resources import Resources
from ttci.model.units import parse_duration_s
from ttci.wire.api import require_object

__all__ = ["BLOCKERS", "MAX_WAIT_S", "QueueInfo", "WaitOptions", "parse_wait_seconds"]

BLOCKERS = ("capacity", "quota", "no_host", "impossible")
MAX_WAIT_S = 30 * 86400


def parse_wait_seconds(v: Any, what: str = "max_wait") -> float:
    """Seconds (a finite number) or text like `90s`, `30m`, `2h`, within 0 .. 30 days (the
    grammar is ttci/model/units.py's)."""
    seconds = parse_duration_s(v, what)
    if seconds > MAX_WAIT_S:
        raise BadInput(f"{what} {v!r} is outside 0 .. 30 days", hint="e.g. 600 or 10m")
    return seconds


@dataclass(frozen=True)
class WaitOptions:
    """Whether an ENV request may wait for capacity, and for how long at most."""

    wait: bool = True
    max_wait_s: float | None = None  # None: as long as it takes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"wait": self.wait}
        if self.max_wait_s is not None:
            out["max_wait"] = self.max_wait_s
        return out

    @classmethod
    def from_dict(cls, d: Any) -> WaitOptions:
        d = require_object(d, "the ENV request")
        wait = d.get("wait", True)
        if not isinstance(wait, bool):
            raise BadInput(f"wait {wait!r} is not true or false", hint='send "wait": false')
        raw = d.get("max_wait")
        return cls(wait, None if raw is None else parse_wait_seconds(raw))


@dataclass(frozen=True)
class QueueInfo:
    """Where a waiting ENV stands: its place in line (1 = next), what blocks it and why, what
    it needs in all, and how long it has waited."""

    position: int
    blocked_by: str
    detail: str
    needs: Resources
    vms: int
    waited_s: float
    reserved: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "blocked_by": self.blocked_by,
            "detail": self.detail,
            "needs": self.needs.to_dict(),
            "vms": self.vms,
            "waited_s": round(self.waited_s, 1),
            "reserved": self.reserved,
        }

    @classmethod
    def from_dict(cls, d: Any) -> QueueInfo:
        d = require_object(d, "the queue information")
        try:
            return cls(
                position=int(d["position"]),
                blocked_by=str(d["blocked_by"]),
                detail=str(d.get("detail", "")),
                needs=Resources.from_dict(dict(d.get("needs") or {})),
                vms=int(d.get("vms", 0)),
                waited_s=float(d.get("waited_s", 0.0)),
                reserved=bool(d.get("reserved", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(
                f"queue information is malformed: {e!r}", hint="see GET /v1/queue"
            ) from e

    def sentence(self) -> str:
        """What a person reads: `queued: 3rd in line, waiting for capacity (...), 12 s`."""
        return (
            f"queued: position {self.position}, waiting for {self.blocked_by.replace('_', ' ')}"
            f" ({self.detail}), {self.waited_s:.0f} s so far"
        )
