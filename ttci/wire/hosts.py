"""A hostd joining a scheduler: registration, heartbeats, the host's report and the answer. Pure.

hostd POSTs a HostRegistration to /v1/hosts/register (bearing the pool's join token) once, then a
Heartbeat to /v1/hosts/heartbeat every `heartbeat_s` seconds bearing its own token: the one it
registered with, which binds the host id to that host (only its holder may beat for the id or
register it again). Both carry `info`, the host's report: what hostd's own `GET /v1/host` shows
(capacity, use, images, accelerator, warm start). `parse_report` checks a report against its
schema (types, sizes, finite numbers, image names) and keeps only its known fields, none of which
is one the scheduler owns (id, url, state, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ttci.model.errors import BadInput
from ttci.model.naming import ImageName
from ttci.wire.api import API_VERSION, check_api, require_object
from ttci.wire.caches import parse_cache_report
from ttci.wire.warm import MAX_SELFTESTS, MAX_TEMPLATES, SELFTEST_TEXT, TEMPLATE_TEXT

__all__ = [
    "HOST_ID_RE",
    "MAX_IMAGES",
    "OWNED_KEYS",
    "URL_RE",
    "Heartbeat",
    "HostRegistration",
    "JoinAnswer",
    "parse_report",
]

# \A...\Z: a whole-string match even through .match (a trailing newline never passes).
HOST_ID_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
URL_RE = re.compile(r"\Ahttps?://[A-Za-z0-9.\-\[\]:]{1,255}:([0-9]{1,5})\Z")
MAX_TOKEN = 4096  # a host token longer than this is no token


def _host_id(d: dict[str, Any]) -> str:
    hid = d.get("id", "")
    if not isinstance(hid, str) or not HOST_ID_RE.match(hid):
        raise BadInput(
            f"host id {str(hid)[:80]!r} is not valid",
            hint="use 1-63 lowercase letters, digits, dots, dashes (pass --host-id)",
        )
    return hid


def _info(d: dict[str, Any], what: str) -> dict[str, Any]:
    info = d.get("info", {})
    if not isinstance(info, dict):
        raise BadInput(f"{what} info must be an object", hint="send hostd's /v1/host")
    return info


@dataclass(frozen=True)
class HostRegistration:
    """A hostd asking to join: where the scheduler reaches it and the token it must send.

    The token is also the host's credential: the first registration of an id binds the id to
    it. Registering the id again (a restarted hostd, a new URL) needs the same token, or, to
    change the token, the old one as current_token; otherwise an admin forgets the host first.
    """

    id: str
    url: str  # http://ADDR:PORT of this hostd's API
    token: str  # the bearer token hostd wants from the scheduler (16+ characters)
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)
    api: int = API_VERSION
    current_token: str = field(default="", repr=False)  # only to change the token

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "api": self.api,
            "id": self.id,
            "url": self.url,
            "token": self.token,
            "info": dict(self.info),
        }
        if self.current_token:
            out["current_token"] = self.current_token
        return out

    @classmethod
    def from_dict(cls, d: Any) -> HostRegistration:
        """Raises BadInput naming the wrong field; ApiVersionError for another API version
        (a registration must say its version)."""
        d = require_object(d, "the host registration")
        hid = _host_id(d)
        url = d.get("url", "")
        m = URL_RE.match(url) if isinstance(url, str) else None
        if m is None or not 0 < int(m[1]) < 65536:
            raise BadInput(
                f"host url {url!r} is not http://ADDR:PORT",
                hint="pass --advertise ADDR:PORT to hostd",
            )
        check_api(d, f"host {hid}", required=True)
        token = d.get("token")
        if not isinstance(token, str) or not 16 <= len(token) <= MAX_TOKEN:
            raise BadInput("registration lacks the host's token (16+ chars)", hint="hostd --token")
        current = d.get("current_token", "")
        if not isinstance(current, str) or len(current) > MAX_TOKEN:
            raise BadInput("current_token must be the host's old token", hint="or leave it out")
        return cls(
            id=hid, url=url, token=token, info=_info(d, "registration"), current_token=current
        )


@dataclass(frozen=True)
class Heartbeat:
    """A registered hostd's periodic report (sent bearing the host's own token)."""

    id: str
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"api": API_VERSION, "id": self.id, "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Any) -> Heartbeat:
        d = require_object(d, "the heartbeat")
        check_api(d, "the heartbeat")
        if not isinstance(d.get("info"), dict):
            raise BadInput("heartbeat info must be an object", hint="send hostd's /v1/host")
        return cls(id=_host_id(d), info=d["info"])


@dataclass(frozen=True)
class JoinAnswer:
    """The scheduler's answer to a registration or heartbeat: beat this often. report_error:
    why the host's report was refused (the host is joined but unhealthy until a good one)."""

    id: str
    heartbeat_s: float
    report_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "heartbeat_s": self.heartbeat_s}
        if self.report_error:
            out["report_error"] = self.report_error
        return out

    @classmethod
    def from_dict(cls, d: Any) -> JoinAnswer:
        d = require_object(d, "the scheduler's join answer")
        try:
            beat = float(d.get("heartbeat_s", 5.0))
        except (TypeError, ValueError) as e:
            raise BadInput(f"heartbeat_s is not a number: {e}", hint='"heartbeat_s": 5') from e
        if not 0.1 <= beat <= 3600:  # also refuses NaN
            raise BadInput(f"heartbeat_s {beat!r} is outside 0.1..3600", hint='"heartbeat_s": 5')
        return cls(
            id=str(d.get("id", "")),
            heartbeat_s=beat,
            report_error=str(d.get("report_error") or "")[:2000],
        )


# -- the host's report ------------------------------------------------------------------------
MAX_IMAGES = 1000
MAX_TEXT = 1000
MAX_KEYS = 100
# Fields of a host record that the scheduler owns: a report may never carry them.
OWNED_KEYS = frozenset(
    {"id", "url", "kind", "state", "drained", "last_seen", "error", "token", "seen_mono", "info"}
)
_RESOURCE_LIMITS = {"cpus": 1e6, "memory_mib": 2**42, "disk_gib": 2**32}
_TEXT_FIELDS = {"version": 64, "machine": 64, "engine": 200, "accel": 16, "accel_why": MAX_TEXT}
_IMAGE_TEXT = ("os", "release", "arch", "profile", "kernel", "built_at", "digest", "recipe_sha256")


class _Bad(ValueError):
    """A report field that breaks the schema (the message says which and how)."""


def _text(v: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise _Bad(f"{where} must be a string of at most {limit} characters")
    return v


def _number(v: Any, where: str, limit: float, whole: bool = False) -> float:
    kinds = (int,) if whole else (int, float)
    wrong = isinstance(v, bool) or not isinstance(v, kinds)
    if wrong or (isinstance(v, float) and not math.isfinite(v)):
        raise _Bad(f"{where} must be a finite {'whole ' if whole else ''}number")
    if not 0 <= v <= limit:
        raise _Bad(f"{where} {str(v)[:40]} is outside 0..{limit:.0f}")
    number: float = v  # an int stays an int in the stored report
    return number


def _resources(v: Any, where: str) -> dict[str, float]:
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be an object of cpus, memory_mib, disk_gib")
    out: dict[str, float] = {}
    for key, limit in _RESOURCE_LIMITS.items():
        if key in v:
            out[key] = _number(v[key], f"{where}.{key}", limit, whole=key != "cpus")
    return out


def _image(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be an object with a name")
    out: dict[str, Any] = {"name": _image_name(v.get("name"), f"{where}.name")}
    for key in _IMAGE_TEXT:
        if key in v:
            out[key] = _text(v[key], f"{where}.{key}", 200)
    if "disk_gib" in v:
        out["disk_gib"] = _number(v["disk_gib"], f"{where}.disk_gib", 65536, whole=True)
    if "bytes" in v:  # the image's files (what a host lacking it fetches)
        out["bytes"] = _number(v["bytes"], f"{where}.bytes", 2**50, whole=True)
    return out


def _image_name(v: Any, where: str) -> str:
    name = _text(v, where, 200)
    try:
        canonical = str(ImageName.parse(name))
    except BadInput as e:
        raise _Bad(f"{where}: {e.message}") from None
    if canonical != name:
        raise _Bad(f"{where} {name!r} is not canonical ({canonical!r})")
    return name


def _list(v: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad(f"{where} must be a list")
    if len(v) > limit:
        raise _Bad(f"{where} lists {len(v)} entries; at most {limit}")
    return v


def _entry(
    v: Any, where: str, texts: Mapping[str, int], numbers: Mapping[str, float]
) -> dict[str, Any]:
    """An object of known text and whole-number fields (others dropped)."""
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be an object")
    out: dict[str, Any] = {k: _text(v[k], f"{where}.{k}", n) for k, n in texts.items() if k in v}
    for k, limit in numbers.items():
        if k in v:
            out[k] = _number(v[k], f"{where}.{k}", limit, whole=not k.endswith("_s"))
    return out


_TEMPLATE_NUMBERS: dict[str, float] = {
    "vcpus": 1024,
    "memory_mib": 2**42,
    "disk_gib": 65536,
    "bytes": 2**50,
}
_TEMPLATE_NUMBERS |= {"hits": 2**53, "qemu": 10**10, "boot_s": 1e6}
_SELFTEST_NUMBERS: dict[str, float] = {"passed": 1000, "tries": 1000, "restore_s": 1e6}


def _warm(v: Any) -> dict[str, Any]:
    """hostd's warm start (hostd.vm.templates.report): templates, self-tests, hits, misses."""
    if not isinstance(v, dict):
        raise _Bad("warm must be an object")
    out: dict[str, Any] = {}
    if "enabled" in v:
        if not isinstance(v["enabled"], bool):
            raise _Bad("warm.enabled must be true or false")
        out["enabled"] = v["enabled"]
    tpls = []
    for n, t in enumerate(_list(v.get("templates", []), "warm.templates", MAX_TEMPLATES)):
        where = f"warm.templates[{n}]"
        row = _entry(t, where, TEMPLATE_TEXT, _TEMPLATE_NUMBERS)
        tpls.append({**row, "image": _image_name(t.get("image"), f"{where}.image")})
    out["templates"] = tpls
    tests = []
    for n, t in enumerate(_list(v.get("selftests", []), "warm.selftests", MAX_SELFTESTS)):
        row = _entry(t, f"warm.selftests[{n}]", SELFTEST_TEXT, _SELFTEST_NUMBERS)
        if not isinstance(t.get("ok"), bool):
            raise _Bad(f"warm.selftests[{n}].ok must be true or false")
        tests.append({**row, "ok": t["ok"]})
    out["selftests"] = tests
    for key in ("bytes", "hits"):
        if key in v:
            out[key] = _number(v[key], f"warm.{key}", 2**53, whole=True)
    misses = v.get("misses", {})
    if not isinstance(misses, dict) or len(misses) > 32:
        raise _Bad("warm.misses must be an object of at most 32 reasons")
    out["misses"] = {}
    for reason, count in misses.items():
        if not re.fullmatch(r"[a-z_]{1,32}", reason):
            raise _Bad(f"warm.misses: {reason[:40]!r} is not a reason (a-z and _)")
        out["misses"][reason] = _number(count, f"warm.misses.{reason}", 2**53, whole=True)
    return out


def _images(v: Any) -> list[dict[str, Any]]:
    return [_image(i, f"images[{n}]") for n, i in enumerate(_list(v, "images", MAX_IMAGES))]


def parse_report(info: Any) -> dict[str, Any]:
    """A host's report (`info`) checked against its schema: only its known fields, each of the
    right type and size (numbers finite and in range, image names canonical).

    Raises:
        BadInput: saying which field is wrong (the scheduler marks the host unhealthy with it).
    """
    try:
        return _parse_report(info)
    except _Bad as e:
        raise BadInput(
            f"the host's report is malformed: {e}", hint="send what hostd's /v1/host shows"
        ) from None


def _parse_report(info: Any) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise _Bad("it must be an object")
    if len(info) > MAX_KEYS:
        raise _Bad(f"it has {len(info)} keys; at most {MAX_KEYS}")
    if owned := sorted(OWNED_KEYS & set(info)):
        raise _Bad(f"{', '.join(owned)}: fields the scheduler owns, never a report's")
    out: dict[str, Any] = {}
    if "host_id" in info:
        hid = info["host_id"]
        if not isinstance(hid, str) or not HOST_ID_RE.match(hid):
            raise _Bad("host_id must be a host id")
        out["host_id"] = hid
    for key, limit in _TEXT_FIELDS.items():
        if key in info:
            out[key] = _text(info[key], key, limit)
    checks: dict[str, Callable[[Any, str], Any]] = {
        "api": lambda v, k: _number(v, k, 10**7, whole=True),
        "vms": lambda v, k: _number(v, k, 10**7, whole=True),
        **dict.fromkeys(("total", "used", "free"), _resources),
        "images": lambda v, _: _images(v),
        "warm": lambda v, _: _warm(v),
        "caches": lambda v, _: parse_cache_report(v),
    }
    out.update({key: check(info[key], key) for key, check in checks.items() if key in info})
    return out
