"""The target grammar, image names, releases and prefix selection. Pure.

One grammar names what a job runs on, wherever it is written:

    [ENGINE:]OS-VERSION[+PROFILE][:ARCH]      e.g. debian-12, debian-12:arm64,
                                                   qemu:debian-12+systemd:amd64

`OS-VERSION` is a release (the version starts with a digit), `+PROFILE` an image profile
(`agent` when left out) or the name of the image recipe an image was built from (`+gitlab`),
`ARCH` any name of the arch table (Debian's, uname's, GitHub's X64 or ARM64, ...). GitLab's
TT_OS/TT_ARCH and `image:`, GitHub's runs-on labels (one OS label, one architecture label),
`tt job run --os/--arch` and image names (`ENGINE:OS[+PROFILE]:ARCH`, every part required) all
parse with it into a `Target`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ttci.model.arch import Arch
from ttci.model.errors import BadInput

__all__ = [
    "DEFAULT_PROFILE",
    "ENGINES",
    "OS_HINT",
    "PROFILES",
    "RELEASES",
    "ImageName",
    "Release",
    "Target",
    "image_targets",
    "images_serving",
    "match_os",
    "parse_arch",
    "parse_os",
    "parse_profile",
    "parse_release",
    "parse_target",
    "parse_variant",
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

# The grammar's words, each defined once.
_RELEASE = r"(?P<release>[a-z][a-z0-9]*-[0-9][0-9a-z.]*)"  # OS-VERSION: debian-12
_PROFILE = r"(?:\+(?P<profile>[a-z0-9-]+))?"
_OS_RE = re.compile(f"\\A{_RELEASE}{_PROFILE}\\Z")
_NAME_RE = re.compile(f"\\A(?P<engine>[a-z0-9]+):{_RELEASE}{_PROFILE}:(?P<arch>[a-z0-9_]+)\\Z")
OS_HINT = "write OS-RELEASE, e.g. debian-12 (see `tt image list`)"


def parse_release(value: str) -> Release:
    try:
        return RELEASES[value.strip().lower()]
    except KeyError:
        known = ", ".join(RELEASES)
        raise BadInput(
            f"unknown release {value!r}", hint=f"use one of: {known} (OS-VERSION, e.g. debian-12)"
        ) from None


def parse_arch(
    value: str, hint: str = "pass --arch with a Debian architecture name", what: str = ""
) -> Arch:
    """Any name of the arch table, or BadInput (prefixed with `WHAT: ` when given)."""
    try:
        return Arch.parse(value)
    except ValueError as e:
        raise BadInput(f"{what}: {e}" if what else str(e), hint=hint) from None


def match_os(text: str) -> tuple[str, str | None] | None:
    """(release, profile or None) when text is an OS word (`debian-12`, `debian-12+systemd`)."""
    m = _OS_RE.match(text.strip().lower())
    return (m["release"], m["profile"]) if m else None


def parse_os(text: str, what: str = "OS") -> tuple[str, str | None]:
    """match_os, or BadInput saying `WHAT 'text' is not an OS release`."""
    found = match_os(text)
    if found is None:
        raise BadInput(f"{what} {text!r} is not an OS release", hint=OS_HINT)
    return found


_VARIANT_RE = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


def parse_variant(value: str) -> str:
    """An image name's `+WORD`: a profile, or the name of the image recipe it was built from
    (`qemu:debian-12+gitlab:amd64`, hostd/builders/recipe.py)."""
    if value in PROFILES or _VARIANT_RE.match(value):
        return value
    raise BadInput(
        f"image variant {value!r} is neither a profile nor a recipe name",
        hint=f"profiles: {', '.join(PROFILES)}; a recipe's name is a letter, then up to 31 "
        "lowercase letters, digits or dashes",
    )


def parse_profile(value: str) -> str:
    if value not in PROFILES:
        raise BadInput(f"unknown profile {value!r}", hint=f"use one of: {', '.join(PROFILES)}")
    return value


@dataclass(frozen=True, order=True)
class ImageName:
    engine: str
    release: str  # e.g. debian-12
    arch: Arch
    profile: str = DEFAULT_PROFILE  # a profile, or the name of the recipe it was built from

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
        profile = parse_variant(m["profile"] or DEFAULT_PROFILE)
        return cls(
            engine=m["engine"], release=m["release"], arch=parse_arch(m["arch"]), profile=profile
        )

    @property
    def target(self) -> Target:
        return Target(self.release, self.arch, self.profile)


@dataclass(frozen=True, order=True)
class Target:
    """What a job runs on: an OS release, an architecture and an image profile."""

    release: str  # OS-VERSION, e.g. debian-12
    arch: Arch
    profile: str = DEFAULT_PROFILE
    source: str = field(default="", compare=False)  # where it was asked for, for messages

    @property
    def os(self) -> str:
        """The OS word: `debian-12`, or `debian-12+systemd` with a profile."""
        suffix = "" if self.profile == DEFAULT_PROFILE else f"+{self.profile}"
        return f"{self.release}{suffix}"

    @property
    def os_prefix(self) -> str:
        """`debian-12+systemd:arm64`: the target as the scheduler's image selector."""
        return f"{self.os}:{self.arch.value}"

    @property
    def label(self) -> str:
        """`debian-12/arm64`, as `tt job run` shows it."""
        return f"{self.os}/{self.arch.value}"

    @property
    def slug(self) -> str:
        """File- and ENV-name safe: `debian-12-systemd-arm64`."""
        return f"{self.os}-{self.arch.value}".replace("+", "-")

    def image(self, engine: str = ENGINES[0]) -> ImageName:
        return ImageName(engine, self.release, self.arch, self.profile)

    def __str__(self) -> str:
        return self.os_prefix


def parse_target(
    text: str, default_arch: Arch | None = None, what: str = "target", source: str = ""
) -> Target:
    """`[ENGINE:]OS-VERSION[+PROFILE][:ARCH]`; ARCH may be left out when default_arch is given.

    Raises:
        BadInput: naming what (`image 'x' ...`) and the part that is wrong.
    """
    parts = text.strip().lower().split(":")
    if parts[0] in ENGINES:
        parts = parts[1:]
    shape = BadInput(
        f"{what} {text!r} does not name an OS and architecture",
        hint=f"write {what}: OS-RELEASE:ARCH, e.g. debian-12:arm64",
    )
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise shape
    release, profile = parse_os(parts[0], what)
    arch = default_arch
    if len(parts) == 2:
        arch = parse_arch(parts[1], hint="e.g. amd64 or arm64", what=f"{what} {text!r}")
    if arch is None:
        raise shape
    return Target(release, arch, profile or DEFAULT_PROFILE, source)


def image_targets(images: Iterable[str]) -> dict[str, Target]:
    """The target each image name serves (names that do not parse are left out)."""
    out: dict[str, Target] = {}
    for name in images:
        try:
            out[name] = ImageName.parse(name).target
        except BadInput:
            continue
    return out


def images_serving(target: Target, images: Iterable[str]) -> list[str]:
    """The images (any engine) whose target is target."""
    return [name for name, t in image_targets(images).items() if t == target]


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
