"""What the daemons' Prometheus metrics share: states, resources, content type, build info.

One unit per metric, in base units (Prometheus naming practice): a resource is three metrics,
`..._cpus`, `..._memory_bytes` and `..._disk_bytes`, never one metric with a `resource` label
mixing CPUs, MiB and GiB."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ttci import __version__

__all__ = ["CONTENT_TYPE", "RESOURCE_UNITS", "VM_STATES", "BuildInfo", "by_state"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
VM_STATES = ("creating", "running", "lost", "failed")
# (key in a Resources dict, metric name suffix, factor to the base unit)
RESOURCE_UNITS = (
    ("cpus", "cpus", 1),
    ("memory_mib", "memory_bytes", 1 << 20),
    ("disk_gib", "disk_bytes", 1 << 30),
)


class BuildInfo(Collector):
    """`ttci_build_info{program, version} 1`: which release each daemon runs (an upgrade in
    progress shows as two versions)."""

    def __init__(self, program: str) -> None:
        self.program = program

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "ttci_build_info",
            "The running release (always 1; the labels say which)",
            labels=["program", "version"],
        )
        info.add_metric([self.program, __version__], 1)
        yield info


def by_state(rows: list[tuple[str, int]], known: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(known, 0)
    for state, n in rows:
        counts[state] = counts.get(state, 0) + n
    return counts
