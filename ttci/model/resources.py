"""Resource accounting: does a request fit a host? Pure; refusals carry the numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Resources", "shortfall", "validate_vm_size"]


@dataclass(frozen=True)
class Resources:
    cpus: float = 0
    memory_mib: int = 0
    disk_gib: int = 0

    def __add__(self, o: Resources) -> Resources:
        return Resources(
            self.cpus + o.cpus, self.memory_mib + o.memory_mib, self.disk_gib + o.disk_gib
        )

    def __sub__(self, o: Resources) -> Resources:
        return Resources(
            self.cpus - o.cpus, self.memory_mib - o.memory_mib, self.disk_gib - o.disk_gib
        )

    def fits_in(self, free: Resources) -> bool:
        return (
            self.cpus <= free.cpus
            and self.memory_mib <= free.memory_mib
            and self.disk_gib <= free.disk_gib
        )

    def text(self) -> str:
        cpus = f"{self.cpus:g}"
        return f"{cpus} CPU, {self.memory_mib} MiB memory, {self.disk_gib} GiB disk"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Resources:
        return cls(float(d.get("cpus", 0)), int(d.get("memory_mib", 0)), int(d.get("disk_gib", 0)))


def shortfall(need: Resources, total: Resources, used: Resources) -> str | None:
    """None when need fits; otherwise a sentence with the numbers."""
    free = total - used
    if need.fits_in(free):
        return None
    return f"needs {need.text()}; free {free.text()} (of {total.text()})"


def validate_vm_size(cpus: float, memory_mib: int, disk_gib: int) -> list[str]:
    """Problems with a per-VM size, each saying the allowed range."""
    problems = []
    if not 0.1 <= cpus <= 64:
        problems.append(f"--cpus {cpus:g} is outside 0.1..64")
    if not 128 <= memory_mib <= 262144:
        problems.append(f"--memory {memory_mib} MiB is outside 128..262144 MiB")
    if not 1 <= disk_gib <= 4096:
        problems.append(f"--disk {disk_gib} GiB is outside 1..4096 GiB")
    return problems
