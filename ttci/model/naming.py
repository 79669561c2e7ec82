"""Image names (`ENGINE:OS-RELEASE[+PROFILE]:ARCH`), releases and prefix selection. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ttci.model.arch import Arch
from ttci.model.errors import BadInput

__all__ = [
    "DEFAULT_PROFILE",
    "ENGINES",
    "PROFILES",
    "RELEASES",
    "ImageName",
    "Release",
    "parse_arch",
    "parse_profile",
    "parse_release",
    "select_by_prefix",
]

ENGINES = ("qemu",)
PROFILES = ("agent", "systemd")
DEFAULT_PROFILE = "agent"


@dataclass(frozen=True)
class Release:
    """A Debian release we can build: `debian-12` is bookworm."""

    os: str
    version: str
    suite: str
    testing: bool = False  # testing suites have expired InRelease files on snapshot mirrors

    @property
    def name(self) -> str:
        return f"{self.os}-{self.version}"


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release("debian", "12", "bookworm"),
        Release("debian", "13", "trixie"),
        Release("debian", "14", "forky", testing=True),
    )
}

_NAME_RE = re.compile(
    r"^(?P<engine>[a-z0-9]+):(?P<os>[a-z][a-z0-9]*)-(?P<version>[0-9a-z.]+)"
    r"(?:\+(?P<profile>[a-z0-9-]+))?:(?P<arch>[a-z0-9_]+)$"
)


def parse_release(value: str) -> Release:
    try:
        return RELEASES[value.strip().lower()]
    except KeyError:
        known = ", ".join(RELEASES)
        raise BadInput(
            f"unknown release {value!r}", hint=f"use one of: {known} (OS-VERSION, e.g. debian-12)"
        ) from None


def parse_arch(value: str) -> Arch:
    try:
        return Arch.parse(value)
    except ValueError as e:
        raise BadInput(str(e), hint="pass --arch with a Debian architecture name") from None


def parse_profile(value: str) -> str:
    if value not in PROFILES:
        raise BadInput(f"unknown profile {value!r}", hint=f"use one of: {', '.join(PROFILES)}")
    return value


@dataclass(frozen=True, order=True)
class ImageName:
    engine: str
    release: str  # e.g. debian-12
    arch: Arch
    profile: str = DEFAULT_PROFILE

    def __str__(self) -> str:
        suffix = "" if self.profile == DEFAULT_PROFILE else f"+{self.profile}"
        return f"{self.engine}:{self.release}{suffix}:{self.arch.value}"

    @property
    def os(self) -> str:
        return self.release.split("-", 1)[0]

    @property
    def dirname(self) -> str:
        """File-system safe, one-to-one with the name."""
        return str(self).replace(":", "_")

    @classmethod
    def parse(cls, text: str) -> ImageName:
        m = _NAME_RE.match(text.strip().lower())
        if not m:
            raise BadInput(
                f"image name {text!r} does not parse",
                hint="write ENGINE:OS-RELEASE[+PROFILE]:ARCH, e.g. qemu:debian-12:arm64",
            )
        if m["engine"] not in ENGINES:
            raise BadInput(f"unknown engine {m['engine']!r} in {text!r}", hint="use qemu")
        profile = parse_profile(m["profile"] or DEFAULT_PROFILE)
        return cls(
            engine=m["engine"],
            release=f"{m['os']}-{m['version']}",
            arch=parse_arch(m["arch"]),
            profile=profile,
        )


def select_by_prefix(names: Iterable[str], prefixes: str) -> list[str]:
    """TT's `--os-prefix=cent,ubuntu2004`: case-insensitive prefix match over image names.

    A prefix may omit the engine (`debian-12` matches `qemu:debian-12:amd64`).
    """
    wanted = [p.strip().lower() for p in prefixes.split(",") if p.strip()]
    out: list[str] = []
    for name in sorted(names):
        low = name.lower()
        bare = low.split(":", 1)[1] if ":" in low else low
        if any(low.startswith(p) or bare.startswith(p) for p in wanted):
            out.append(name)
    return out
