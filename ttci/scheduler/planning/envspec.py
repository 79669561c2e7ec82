"""ENV requests: parsing names, sizes, lifetimes and expanding prefixes to VMs. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ttci.model.errors import BadInput
from ttci.model.naming import ImageName, select_by_prefix
from ttci.model.ports import parse_ports, ports_text
from ttci.model.resources import validate_vm_size

__all__ = [
    "DEFAULT_LIFE_S",
    "ENV_NAME_RE",
    "MAX_VMS",
    "ORIGIN_KEYS",
    "ORIGIN_KINDS",
    "EnvRequest",
    "parse_duration",
    "parse_origin",
]

ENV_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
DEFAULT_LIFE_S = 3600
MAX_VMS = 100_000
ORIGIN_KINDS = ("cli", "gitlab", "github", "jenkins", "admin")
ORIGIN_KEYS = {"kind": 20, "job": 200, "url": 500, "project": 200, "runner": 200}


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadInput(f"deny_outgoing must be true or false, not {v!r}", hint="send a boolean")
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
        if not isinstance(value, str | int) or len(str(value)) > ORIGIN_KEYS[key]:
            raise BadInput(
                f"origin.{key} must be a string of at most {ORIGIN_KEYS[key]} characters",
                hint="shorten it",
            )
        out[key] = str(value)
    out.setdefault("kind", "cli")
    if out["kind"] not in ORIGIN_KINDS:
        raise BadInput(f"origin.kind {out['kind']!r} is unknown", hint=f"one of {ORIGIN_KINDS}")
    if out.get("url") and not re.match(r"^https?://", out["url"]):
        raise BadInput(f"origin.url {out['url']!r} is not an http(s) link", hint="https://...")
    return out


def parse_duration(text: str | int | float) -> int:
    """`90`, `90s`, `30m`, `1h`, `2d` -> seconds."""
    if isinstance(text, int | float):
        seconds = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text).lower())
        if not m:
            raise BadInput(f"lifetime {text!r} does not parse", hint="write e.g. 90s, 30m, 1h, 2d")
        seconds = int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if not 10 <= seconds <= 30 * 86400:
        raise BadInput(
            f"lifetime {seconds} s is outside 10 s .. 30 days",
            hint="pass --life-time between 10s and 30d",
        )
    return seconds


@dataclass(frozen=True)
class EnvRequest:
    name: str
    os_prefix: str
    cpus: float = 1
    memory_mib: int = 512
    disk_gib: int = 0
    dup_each: int = 1
    life_s: int = DEFAULT_LIFE_S
    deny_outgoing: bool = False
    vm_ports: str = ""  # "22,8080,53/udp": each VM's ports mapped to host ports
    origin: dict[str, str] = field(default_factory=lambda: {"kind": "cli"}, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnvRequest:
        try:
            req = cls(
                name=str(d["name"]).strip(),
                os_prefix=str(d["os_prefix"]),
                cpus=float(d.get("cpus", 1)),
                memory_mib=int(d.get("memory_mib", 512)),
                disk_gib=int(d.get("disk_gib", 0)),
                dup_each=int(d.get("dup_each", 1)),
                life_s=parse_duration(d.get("life_time", DEFAULT_LIFE_S)),
                origin=parse_origin(d.get("origin")),
                deny_outgoing=_flag(d.get("deny_outgoing", False)),
                vm_ports=ports_text(parse_ports(d.get("vm_ports", ""))),
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

    def vms(self, images: list[str]) -> list[tuple[str, str]]:
        """(VM name, image) for every VM of the ENV, or BadInput listing what exists."""
        chosen = select_by_prefix(images, self.os_prefix)
        if not chosen:
            raise BadInput(
                f"no image matches --os-prefix {self.os_prefix!r}",
                hint=f"images: {', '.join(sorted(images)) or 'none (build some first)'}",
            )
        if len(chosen) * self.dup_each > MAX_VMS:
            raise BadInput(
                f"{len(chosen) * self.dup_each} VMs is more than {MAX_VMS}",
                hint="narrow --os-prefix or lower --dup-each",
            )
        out = []
        for image in chosen:
            n = ImageName.parse(image)
            base = n.release + (f"-{n.profile}" if n.profile != "agent" else "") + f"-{n.arch}"
            for i in range(1, self.dup_each + 1):
                out.append((base if self.dup_each == 1 else f"{base}-{i}", image))
        return out
