"""What the scheduler's and hostd's Prometheus metrics share: states, resources, content type."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "RESOURCES", "VM_STATES", "by_state"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
VM_STATES = ("creating", "running", "lost", "failed")
RESOURCES = (("cpus", "cpus"), ("memory_mib", "memory_mib"), ("disk_gib", "disk_gib"))


def by_state(rows: list[tuple[str, int]], known: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(known, 0)
    for state, n in rows:
        counts[state] = counts.get(state, 0) + n
    return counts
