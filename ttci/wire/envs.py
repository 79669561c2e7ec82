"""ENVs over HTTP: the ENV request (client -> scheduler), its progress stream, and the VM request
(scheduler -> hostd). Pure.

`tt env add`, `tt job run`, the GitLab driver, the GitHub service and `tt demo` build an
EnvRequest and POST its to_dict() to the scheduler's /v1/envs; the scheduler validates it with
from_dict and, for each VM it places, POSTs a VMRequest to that host's hostd.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ttci.model.cache import CacheScope, CacheSpec
from ttci.model.egress import EgressRule, egress_text, parse_egress
from ttci.model.errors import BadInput
from ttci.model.ports import parse_ports, ports_text
from ttci.model.resources import validate_vm_size
from ttci.model.units import DURATION_HINT, parse_duration_s
from ttci.wire.api import (
    API_VERSION,
    ErrorBody,
    as_int,
    as_number,
    as_text,
    check_api,
    require_object,
)
from ttci.wire.queue import QueueInfo

__all__ = [
    "DEFAULT_LIFE_S",
    "ENV_NAME_RE",
    "MAX_VMS",
    "ORIGIN_KEYS",
    "ORIGIN_KINDS",
    "VM_ID_RE",
    "EnvEvent",
    "EnvRequest",
    "Ports",
    "VMRequest",
    "VmUp",
    "parse_duration",
    "parse_origin",
]

ENV_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,39}\Z")
VM_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
DEFAULT_LIFE_S = 3600
MAX_VMS = 100_000
ORIGIN_KINDS = ("cli", "gitlab", "github", "jenkins", "admin")
ORIGIN_KEYS = {"kind": 20, "job": 200, "url": 500, "project": 200, "runner": 200}

Ports = tuple[tuple[int, str], ...]  # ((22, "tcp"), (53, "udp")): VM ports mapped to host ports


def _flag(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise BadInput(f"{what} must be true or false, not {v!r}", hint="send a boolean")
    return v


def parse_origin(d: Any) -> dict[str, str]:
    """Where an ENV came from: {kind, job, url, project, runner}; shown on the admin page."""
    if d is None:
        return {"kind": "cli"}
    if not isinstance(d, dict):
        raise BadInput("origin must be an object", hint='e.g. {"kind": "gitlab", "job": "123"}')
    out: dict[str, str] = {}
    for key, value in d.items():
        if key not in ORIGIN_KEYS:
            raise BadInput(
                f"origin has an unknown key {key!r}", hint=f"keys: {', '.join(ORIGIN_KEYS)}"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, str | int)
            or len(str(value)) > ORIGIN_KEYS[key]
            or not str(value).isprintable()
        ):
            raise BadInput(
                f"origin.{key} must be a string of at most {ORIGIN_KEYS[key]} printable characters",
                hint="shorten it",
            )
        out[key] = str(value)
    out.setdefault("kind", "cli")
    if out["kind"] not in ORIGIN_KINDS:
        raise BadInput(f"origin.kind {out['kind']!r} is unknown", hint=f"one of {ORIGIN_KINDS}")
    if out.get("url") and not re.fullmatch(r"https?://\S+", out["url"]):
        raise BadInput(f"origin.url {out['url']!r} is not an http(s) link", hint="https://...")
    return out


def _vm_id(v: Any) -> str:
    """A VM id names hostd's files and domains: letters, digits, `_` and `-` only."""
    if not isinstance(v, str) or not VM_ID_RE.fullmatch(v):
        raise ValueError(f"VM id {v!r:.60} is not 1-64 letters, digits, _ or -")
    return v


def parse_duration(text: str | int | float) -> int:
    """`90`, `90s`, `30m`, `1h`, `2d`, `1h30m` -> seconds (10 s .. 30 days); the grammar is
    ttci/model/units.py's."""
    try:
        seconds = int(parse_duration_s(text, "lifetime"))
    except BadInput:
        raise BadInput(f"lifetime {text!r} does not parse", hint=DURATION_HINT) from None
    if not 10 <= seconds <= 30 * 86400:
        raise BadInput(
            f"lifetime {seconds} s is outside 10 s .. 30 days",
            hint="pass --life-time between 10s and 30d",
        )
    return seconds


@dataclass(frozen=True)
class EnvRequest:
    """A group of fresh VMs: one per image matching os_prefix, dup_each times.

    On the wire the lifetime is `life_time` (seconds, or text like `1h`), the ports are
    `vm_ports` (text like `22,8080,53/udp`) and the egress allow-list `allow_egress` (a list of
    rules like `git.example.com`, `*.pypi.org`, `10.1.0.0/16:443`, or one comma-separated text);
    `egress_audit` lets everything through but counts and names what the list would block.
    `cold`: every VM boots cold, never restored from a snapshot template (sent only when true).
    """

    name: str
    os_prefix: str
    cpus: float = 1
    memory_mib: int = 512
    disk_gib: int = 0  # 0: each image's own size
    dup_each: int = 1
    life_s: int = DEFAULT_LIFE_S
    deny_outgoing: bool = False
    vm_ports: Ports = ()
    origin: Mapping[str, str] = field(default_factory=lambda: {"kind": "cli"}, hash=False)
    allow_egress: tuple[EgressRule, ...] = ()
    egress_audit: bool = False
    cache: CacheSpec | None = None  # one cache volume, mounted in every VM of the ENV
    cold: bool = False  # a truly cold boot: no warm start from a snapshot template

    def to_dict(self) -> dict[str, Any]:
        return {
            "api": API_VERSION,
            "name": self.name,
            "os_prefix": self.os_prefix,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "dup_each": self.dup_each,
            "life_time": self.life_s,
            "deny_outgoing": self.deny_outgoing,
            "vm_ports": ports_text(list(self.vm_ports)),
            "origin": dict(self.origin),
            **_egress_dict(self.allow_egress, self.egress_audit),
            **({"cache": self.cache.to_dict()} if self.cache else {}),
            **({"cold": True} if self.cold else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> EnvRequest:
        """Raises BadInput naming the field that is wrong (ApiVersionError: another version)."""
        d = require_object(d, "the ENV request")
        check_api(d, "the ENV request")
        try:
            req = cls(
                name=as_text(d["name"], "name", 100),
                os_prefix=as_text(d["os_prefix"], "os_prefix"),
                cpus=as_number(d.get("cpus", 1), "cpus"),
                memory_mib=as_int(d.get("memory_mib", 512), "memory_mib"),
                disk_gib=as_int(d.get("disk_gib", 0), "disk_gib"),
                dup_each=as_int(d.get("dup_each", 1), "dup_each"),
                life_s=parse_duration(d.get("life_time", DEFAULT_LIFE_S)),
                origin=parse_origin(d.get("origin")),
                deny_outgoing=_flag(d.get("deny_outgoing", False), "deny_outgoing"),
                vm_ports=tuple(parse_ports(d.get("vm_ports", ""))),
                allow_egress=parse_egress(d.get("allow_egress")),
                egress_audit=_flag(d.get("egress_audit", False), "egress_audit"),
                cache=CacheSpec.from_dict(d["cache"]) if d.get("cache") else None,
                cold=_flag(d.get("cold", False), "cold"),
            )
        except KeyError as e:
            raise BadInput(f"ENV request lacks {e}", hint="send name and os_prefix") from None
        except (TypeError, ValueError) as e:
            raise BadInput(
                f"ENV request is malformed: {e}",
                hint="cpus, memory_mib, disk_gib and dup_each are numbers",
            ) from None
        req.validate()
        return req

    def validate(self) -> None:
        if not ENV_NAME_RE.match(self.name):
            raise BadInput(
                f"ENV name {self.name!r} is not valid",
                hint="use 1-40 lowercase letters, digits and dashes, e.g. ci-1234",
            )
        if not self.os_prefix.strip(","):
            raise BadInput("--os-prefix is empty", hint="e.g. --os-prefix debian-12")
        problems = validate_vm_size(self.cpus, self.memory_mib, self.disk_gib or 4)
        if problems:
            raise BadInput("; ".join(problems), hint="pick sizes inside the ranges")
        if not 1 <= self.dup_each <= MAX_VMS:
            raise BadInput(
                f"--dup-each {self.dup_each} is outside 1..{MAX_VMS}", hint="ask for fewer replicas"
            )
        _check_egress(self.deny_outgoing, self.allow_egress, self.egress_audit)


@dataclass(frozen=True)
class VMRequest:
    """One VM for hostd to create, already placed on it by the scheduler."""

    id: str
    env: str
    name: str
    owner: str
    image: str
    cpus: float = 1
    memory_mib: int = 512
    disk_gib: int = 0  # 0: the image's own size
    deny_outgoing: bool = False
    ports: Ports = ()
    allow_egress: tuple[EgressRule, ...] = ()
    egress_audit: bool = False
    cache: CacheSpec | None = None
    cache_project: str = ""  # the cache's scope is (owner, cache_project, cache.key)
    cold: bool = False  # boot cold even where a snapshot template is ready

    @property
    def cache_scope(self) -> CacheScope | None:
        if self.cache is None:
            return None
        return CacheScope(self.owner, self.cache_project or f"user:{self.owner}", self.cache.key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "api": API_VERSION,
            "id": self.id,
            "env": self.env,
            "name": self.name,
            "owner": self.owner,
            "image": self.image,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "deny_outgoing": self.deny_outgoing,
            "ports": ports_text(list(self.ports)),
            **_egress_dict(self.allow_egress, self.egress_audit),
            **(
                {"cache": self.cache.to_dict(), "cache_project": self.cache_project}
                if self.cache
                else {}
            ),
            **({"cold": True} if self.cold else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> VMRequest:
        """Raises BadInput for a malformed request (ApiVersionError: another version)."""
        d = require_object(d, "the VM request")
        check_api(d, "the VM request")
        try:
            req = cls(
                id=_vm_id(d.get("id") or uuid.uuid4().hex[:12]),
                env=as_text(d["env"], "env", 100),
                name=as_text(d["name"], "name", 100),
                owner=as_text(d.get("owner", ""), "owner", 100),
                image=as_text(d["image"], "image", 200),
                cpus=as_number(d.get("cpus", 1), "cpus"),
                memory_mib=as_int(d.get("memory_mib", 512), "memory_mib"),
                disk_gib=as_int(d.get("disk_gib", 0), "disk_gib"),
                deny_outgoing=_flag(d.get("deny_outgoing", False), "deny_outgoing"),
                ports=tuple(parse_ports(d.get("ports"))),
                allow_egress=parse_egress(d.get("allow_egress")),
                egress_audit=_flag(d.get("egress_audit", False), "egress_audit"),
                cache=CacheSpec.from_dict(d["cache"]) if d.get("cache") else None,
                cold=_flag(d.get("cold", False), "cold"),
                cache_project=as_text(d.get("cache_project", ""), "cache_project", 300),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(
                f"VM request is malformed: {e!r}",
                hint="send env, name, image and numeric cpus/memory_mib/disk_gib",
            ) from e
        _check_egress(req.deny_outgoing, req.allow_egress, req.egress_audit)
        return req


def _egress_dict(rules: tuple[EgressRule, ...], audit: bool) -> dict[str, Any]:
    """The egress fields of a request, only when used (older readers never see them)."""
    return {
        **({"allow_egress": egress_text(rules)} if rules else {}),
        **({"egress_audit": True} if audit else {}),
    }


def _check_egress(deny: bool, rules: tuple[EgressRule, ...], audit: bool) -> None:
    if deny and (rules or audit):
        raise BadInput(
            "--deny-outgoing and an egress allow-list (or audit) contradict each other",
            hint="drop --deny-outgoing to allow the listed destinations",
        )


@dataclass(frozen=True)
class VmUp:
    """A VM of a new ENV is up (the `vm` event of `POST /v1/envs?progress=1`)."""

    vm: str
    host: str
    image: str
    boot_s: float = 0.0
    accel: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "host": self.host,
            "image": self.image,
            "boot_s": self.boot_s,
            "accel": self.accel,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmUp:
        try:
            return cls(
                vm=str(d["vm"]),
                host=str(d["host"]),
                image=str(d.get("image", "")),
                boot_s=float(d.get("boot_s") or 0.0),
                accel=str(d.get("accel") or ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"VM event is malformed: {e!r}", hint="send vm and host") from e


@dataclass(frozen=True)
class EnvEvent:
    """One line of `POST /v1/envs?progress=1` (or GET /v1/envs/NAME/progress): `queued` (its
    place in the admission queue, whenever that changes), `granted` (capacity is its: the VMs
    boot), `vm` (one per VM as it comes up), then `ready` (with the ENV as `GET /v1/envs/NAME`
    shows it) or `error` (with the HTTP status the plain request would have answered)."""

    kind: str  # queued, granted, vm, ready or error
    vm: VmUp | None = None
    env: Mapping[str, Any] | None = field(default=None, hash=False)
    error: ErrorBody | None = None
    status: int = 0
    queue: QueueInfo | None = None
    waited_s: float = 0.0

    KINDS = ("queued", "granted", "vm", "ready", "error")

    @property
    def final(self) -> bool:
        """The last event of the stream (ready or error)."""
        return self.kind in ("ready", "error")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "queued" and self.queue is not None:
            return {"event": "queued", **self.queue.to_dict()}
        if self.kind == "granted":
            return {"event": "granted", "waited_s": self.waited_s}
        if self.kind == "vm" and self.vm is not None:
            return {"event": "vm", **self.vm.to_dict()}
        if self.kind == "ready":
            return {"event": "ready", "env": dict(self.env or {})}
        err = self.error or ErrorBody("unknown error")
        return {"event": "error", "error": err.error, "hint": err.hint, "status": self.status}

    @classmethod
    def from_dict(cls, d: Any) -> EnvEvent:
        d = require_object(d, "an ENV event")
        kind = d.get("event")
        if kind == "queued":
            return cls("queued", queue=QueueInfo.from_dict(d))
        if kind == "granted":
            waited = d.get("waited_s", 0.0)
            return cls("granted", waited_s=float(waited) if isinstance(waited, int | float) else 0)
        if kind == "vm":
            return cls("vm", vm=VmUp.from_dict(d))
        if kind == "ready":
            return cls("ready", env=require_object(d.get("env"), "the ready event's env"))
        if kind == "error":
            status = d.get("status", 0)
            return cls(
                "error",
                error=ErrorBody.from_dict(d),
                status=status if isinstance(status, int) else 0,
            )
        raise BadInput(f"ENV event kind {kind!r} is unknown", hint=f"one of {cls.KINDS}")
