"""Warm start as hosts report it and the pool shows it. Pure.

hostd's report (`GET /v1/host`, every heartbeat) carries `warm`: its snapshot templates (image,
size, state, hits), the restore self-test per (architecture, QEMU, accelerator), warm hits and
cold starts by reason (hostd.vm.templates). ttci.wire.hosts.parse_report checks it against the
bounds here; `image_warmth` says, from every up host's report, whether VMs of an image start
warm and, if not, why: what `tt image list`, the admin page and the scheduler's /metrics show.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MAX_SELFTESTS",
    "MAX_TEMPLATES",
    "MISS_REASONS",
    "SELFTEST_TEXT",
    "TEMPLATE_TEXT",
    "host_warmth",
    "image_warmth",
]

MAX_TEMPLATES = 500
MAX_SELFTESTS = 100
# A template's and a self-test's text fields and their longest lengths (others are dropped).
TEMPLATE_TEXT = {"id": 40, "arch": 32, "accel": 16, "state": 16, "error": 500, "created_at": 64}
SELFTEST_TEXT = {"target": 120, "arch": 32, "qemu": 32, "accel": 16, "detail": 1000}
SELFTEST_TEXT |= {"tested_at": 64}
# Why a VM booted cold (hostd counts each): warm start off on the host, the request asked for a
# cold boot, the image's profile or agent cannot, the architecture's restore self-test failed,
# its template is being made, there is none yet, making it failed, or its restore failed.
MISS_REASONS = (
    "off",
    "asked",
    "profile",
    "old_agent",
    "selftest_failed",
    "building",
    "no_template",
    "template_failed",
    "restore_failed",
)


def _selftest(warm: Mapping[str, Any], arch: str) -> Mapping[str, Any] | None:
    """The latest restore self-test of arch on a host (another QEMU's may be older)."""
    tests = [t for t in warm.get("selftests", []) if t.get("arch") == arch]
    return max(tests, key=lambda t: str(t.get("tested_at", ""))) if tests else None


def host_warmth(image: Mapping[str, Any], warm: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether one host starts VMs of image (its report's entry) warm; if not, why."""
    if warm is None:
        return False, "the host does not report warm start (an older hostd)"
    if not warm.get("enabled", True):
        return False, "warm start is off on the host (hostd --no-warm)"
    profile = image.get("profile", "agent")
    if profile != "agent":
        return False, f"profile {profile} boots cold"
    test = _selftest(warm, str(image.get("arch", "")))
    if test is not None and not test.get("ok"):
        return False, f"restore self-test failed on QEMU {test.get('qemu', '?')}: " + str(
            test.get("detail", "")
        )
    states = {
        t.get("state"): t for t in warm.get("templates", []) if t.get("image") == image["name"]
    }
    if "ready" in states:
        return True, ""
    if "building" in states:
        return False, "its template is being made"
    if "failed" in states:
        return False, f"its template failed: {states['failed'].get('error', '')}"
    return False, "no template yet (made on first use, or `tt image warm`)"


def image_warmth(
    image: Mapping[str, Any], hosts: Iterable[tuple[str, Mapping[str, Any] | None]]
) -> dict[str, Any]:
    """{"start": "warm"|"cold", "why": ..., "warm_hosts": [...], "cold": {host: why}} for an
    image over the (host id, warm report) of the hosts that have it. warm: some host has a
    ready template of it (VMs placed elsewhere boot cold, each host says why)."""
    warm_hosts, cold = [], {}
    for host, report in hosts:
        ok, why = host_warmth(image, report)
        if ok:
            warm_hosts.append(host)
        else:
            cold[host] = why
    reasons = sorted(set(cold.values()))
    if warm_hosts:
        start, why = "warm", ""
    elif len(reasons) == 1:
        start, why = "cold", reasons[0]
    else:
        start, why = "cold", "; ".join(f"{h}: {w}" for h, w in sorted(cold.items()))
    return {"start": start, "why": why[:1000], "warm_hosts": sorted(warm_hosts), "cold": cold}
