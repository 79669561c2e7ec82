"""`tt image check`: boot an image and ask its agent `uname -m`, timing the first answer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hostd.images.catalogue import Image
from hostd.vm.accel import choose_accel
from hostd.vm.direct_vm import boot
from ttci.model.arch import Arch
from ttci.model.errors import BootError

__all__ = ["CheckResult", "check_image"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    accel: str
    accel_why: str
    machine: str
    expected: str
    first_answer_s: float
    uname_s: float

    @property
    def ok(self) -> bool:
        return self.machine == self.expected

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "ok": self.ok}


def check_image(image: Image, *, timeout: float = 90) -> CheckResult:
    """Raises BootError (with the console's last lines) when the agent never answers."""
    accel, why = choose_accel(image)
    arch = Arch.parse(image.manifest.arch)
    with boot(image.manifest, image.path, accel=accel) as vm, vm.connect(timeout=timeout) as agent:
        first = time.monotonic() - vm.started
        t0 = time.monotonic()
        status, out, err = agent.output(["uname", "-m"])
        took = time.monotonic() - t0
    if not status.ok:
        raise BootError(f"uname -m failed in {image.name}: {err.decode(errors='replace')}")
    return CheckResult(
        name=image.name,
        accel=accel,
        accel_why=why,
        machine=out.decode().strip(),
        expected=arch.row.uname,
        first_answer_s=first,
        uname_s=took,
    )
