"""Our runner label scheme: `runs-on: [self-hosted, tt, debian-12, arm64]`. Pure.

A job is ours when its labels hold `self-hosted` and our marker label (`tt` by default). Then
exactly one OS label (`debian-12`, or with an image profile `debian-12+systemd`) and exactly one
architecture (any name of the arch table: Debian's, uname's, GitHub's `X64`/`ARM64`/`X86`/`ARM`)
pick the image; `linux` may be there too. Anything else means the job asks for something we
cannot give it. Labels are read with the one target grammar (ttci.model.naming).
"""

from __future__ import annotations

from dataclasses import dataclass

from ttci.model.arch import Arch
from ttci.model.naming import DEFAULT_PROFILE, Target, match_os

__all__ = ["IGNORED", "SOURCE", "Match", "Target", "jit_labels", "parse_labels"]

IGNORED = frozenset({"self-hosted", "linux"})
SOURCE = "runs-on"  # a Target's source: where the job asked for it


@dataclass(frozen=True)
class Match:
    """The outcome of reading a job's labels: ours (target) or not (reason), or none of ours."""

    ours: bool
    target: Target | None = None
    reason: str = ""


def _arch(label: str) -> Arch | None:
    try:
        return Arch.parse(label)
    except ValueError:
        return None


def parse_labels(labels: list[str], marker: str = "tt") -> Match:
    """Read a job's `runs-on` labels.

    Returns Match(ours=False) for jobs meant for other runners (no `self-hosted` or no marker),
    Match(ours=True, target=...) for jobs we serve, and Match(ours=True, reason=...) for jobs
    that carry our marker but that we cannot serve (the reason says why and how to fix it).
    """
    low = [str(x).strip().lower() for x in labels]
    if "self-hosted" not in low or marker.lower() not in low:
        return Match(ours=False)
    oses: list[tuple[str, tuple[str, str | None]]] = []  # (label, (release, profile))
    arches: list[Arch] = []
    unknown: list[str] = []
    for label in low:
        if label in IGNORED or label == marker.lower():
            continue
        arch = _arch(label)
        os_word = match_os(label)
        if arch is not None:
            arches.append(arch)
        elif os_word is not None:
            oses.append((label, os_word))
        else:
            unknown.append(label)
    example = f"runs-on: [self-hosted, {marker}, debian-12, arm64]"
    if unknown:
        return Match(
            True,
            reason=f"labels {', '.join(unknown)} are not part of TT CI's scheme; use {example}",
        )
    if len(oses) != 1:
        what = "no OS label" if not oses else f"several OS labels ({', '.join(o for o, _ in oses)})"
        return Match(True, reason=f"{what}; name exactly one, e.g. {example}")
    if len(set(arches)) != 1:
        what = (
            "no architecture label"
            if not arches
            else f"several architectures ({', '.join(a.value for a in arches)})"
        )
        return Match(True, reason=f"{what}; name exactly one, e.g. {example}")
    [(_, (release, profile))] = oses
    return Match(True, target=Target(release, arches[0], profile or DEFAULT_PROFILE, SOURCE))


def jit_labels(labels: list[str]) -> list[str]:
    """The labels the JIT runner registers with: the job's own, deduplicated, order kept."""
    out: list[str] = []
    for label in labels:
        if label.lower() not in (x.lower() for x in out):
            out.append(label)
    return out
