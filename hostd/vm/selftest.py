"""The restore self-test: can this host's QEMU restore a template of this architecture?

QEMU 7.2 restores ppc64 guests nearly never and riscv64 ones not always
(docs/facts/warm-start.md): before VMs of an (architecture, QEMU, accelerator) start from
templates, a few throw-away clones of the first template are restored, given an identity and
asked a command. One failure fails the test.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.builders.save_image import SaveHeader
from hostd.storage.volumes import Volumes, template_volume
from hostd.vm.engine import Engine
from hostd.vm.warm import CloneSpec, TemplateError, identity_for, restore_clone, wake
from ttci.infra.db import Store, now
from ttci.model.errors import TTError

__all__ = [
    "SELFTEST_TRIES",
    "SELFTEST_WAKE_S",
    "WAKE_TIMEOUT_S",
    "SelfTest",
    "restore_selftest",
    "selftest_once",
    "target_of",
]

log = logging.getLogger("hostd.vm.selftest")
SELFTEST_TRIES = 3
WAKE_TIMEOUT_S = 30.0  # restore to agent takes 0.1-0.7 s on an idle host; give load room
SELFTEST_WAKE_S = 20.0  # a guest that hangs after restore (ppc64, riscv64 on QEMU 7.2) ends it


@dataclass(frozen=True)
class SelfTest:
    ok: bool
    passed: int
    tries: int
    detail: str
    restore_s: float  # median seconds from restore to the clone's answer

    def to_row(self) -> dict[str, Any]:
        return {
            "ok": int(self.ok),
            "passed": self.passed,
            "tries": self.tries,
            "detail": self.detail,
            "restore_s": self.restore_s,
        }


def target_of(arch: str, qemu: int, accel: str) -> str:
    """What a self-test is recorded under: ARCH/qemu-VERSION/ACCEL."""
    return f"{arch}/qemu-{qemu}/{accel}"


def selftest_once(  # noqa: PLR0917 - the template and where its result goes
    store: Store,
    engine: Engine,
    host_id: str,
    row: dict[str, Any],
    header: SaveHeader,
    stop: threading.Event,
    volumes: Volumes,
) -> SelfTest | None:
    """Self-test row's (architecture, QEMU, accelerator) unless it has been; record the result.
    None: tested before (the record says how it went)."""
    target = target_of(row["arch"], row["qemu"], row["accel"])
    with store.lock:
        if store.db.table("restore_tests").count_where("target = ?", [target]):
            return None
    result = restore_selftest(engine, host_id, row, header, stop, volumes)
    what = {"target": target, "arch": row["arch"], "qemu": row["qemu"], "accel": row["accel"]}
    with store.lock:
        store.db.table("restore_tests").insert(
            {**what, **result.to_row(), "tested_at": now()}, replace=True
        )
    log.info("restore self-test %s: %s", target, result.detail)
    return result


def restore_selftest(  # noqa: PLR0917 - the template, and where its clones' disks come from
    engine: Engine,
    host_id: str,
    row: dict[str, Any],
    header: SaveHeader,
    stop: threading.Event,
    volumes: Volumes,
) -> SelfTest:
    """Restore SELFTEST_TRIES clones of the template row, one after the other.

    Raises:
        TemplateError: hostd is stopping (nothing is recorded then).
    """
    passed, times, detail = 0, [], ""
    for n in range(SELFTEST_TRIES):
        if stop.is_set():
            raise TemplateError("hostd is stopping")
        try:
            times.append(_restore_once(engine, host_id, row, header, n, stop, volumes))
            passed += 1
        except TTError as e:
            detail = f"{passed}/{n + 1} restores woke; then: {e.message[:300]}"
            break
    median = round(sorted(times)[len(times) // 2], 3) if times else 0.0
    ok = passed == SELFTEST_TRIES
    return SelfTest(
        ok, passed, SELFTEST_TRIES, detail or f"{passed}/{passed} restores woke", median
    )


def _restore_once(  # noqa: PLR0917 - the steps' inputs, passed along once
    engine: Engine,
    host_id: str,
    row: dict[str, Any],
    header: SaveHeader,
    n: int,
    stop: threading.Event,
    volumes: Volumes,
) -> float:
    """Restore one throw-away clone, give it an identity, run a command; its seconds."""
    directory = Path(row["dir"]) / f"st{n}"  # short: unix socket paths end at 108 bytes
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    mac = f"52:54:00:7e:{n:02x}:{secrets.randbelow(256):02x}"
    name = f"selftest-{n}"
    meta = {"host": host_id, "vm": f"selftest-{row['id']}", "template": row["id"]}
    clone = CloneSpec(f"{row['domain']}-t{n}", str(uuid.uuid4()), directory, ("", mac), meta)
    net = {"mac": mac, "ip": "192.0.2.2/30", "gateway": None, "dns": None}  # TEST-NET-1, no route
    vol, owner = template_volume(row["id"], n), f"template:{row['id']}"

    def make_disk(dest: Path, size_gib: int) -> Path:
        src = template_volume(row["id"])
        return volumes.clone(src, vol, kind="vm", owner=owner, dest=dest, size_gib=size_gib)

    t0 = time.monotonic()
    try:
        restore_clone(engine, Path(row["dir"]), header, clone, make_disk, row["disk_gib"])
        identity = identity_for(name, secrets.token_hex(16), net)
        alive = lambda: not stop.is_set() and engine.is_running(clone.name)  # noqa: E731
        with wake(clone.agent_socket, row["token"], identity, SELFTEST_WAKE_S, alive) as agent:
            st, out, _ = agent.output(["hostname"], timeout=SELFTEST_WAKE_S)
        if not st.ok or out.decode(errors="replace").strip() != name:
            raise TemplateError(f"the restored VM answered {st.text()}, {out[:80]!r}")
        return time.monotonic() - t0
    finally:
        with contextlib.suppress(TTError):
            engine.destroy(clone.name)
        volumes.destroy(vol)
        shutil.rmtree(directory, ignore_errors=True)
