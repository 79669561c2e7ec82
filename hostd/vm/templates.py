"""The snapshot templates of one hostd: which exist, which a VM uses, when one is made or dropped.

A template is keyed by everything its memory state depends on: the image build (manifest inputs,
kernel, initrd and disk digests), the VM's vCPUs, memory and disk size, the accelerator and the
QEMU version. Any change makes a new key, so a stale template is never picked; it is deleted once
no VM's overlay sits on its disk any more (`collect`). Templates are made one at a time, in the
background on first use or on request (`tt image warm`). Before the first template of an
(architecture, QEMU, accelerator) is used, its restore is self-tested a few times and the result
recorded: where restore fails or is flaky, VMs of that architecture boot cold, and the reason is
shown (`tt image list`, /v1/host, /metrics). Every row is written before its files or domain
exist, so a hostd killed half-way leaves nothing that `reconcile` does not remove.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import queue
import secrets
import shutil
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from hostd.builders.save_image import SaveHeader
from hostd.images.catalogue import Image
from hostd.storage.volumes import Volumes, template_volume
from hostd.vm.disk import dir_bytes, image_digest, image_source
from hostd.vm.engine import Engine
from hostd.vm.selftest import SELFTEST_TRIES, WAKE_TIMEOUT_S, selftest_once, target_of
from hostd.vm.spares import Spares, reap_parts
from hostd.vm.warm import (
    SAVE_FILE,
    TemplateError,
    TemplateSpec,
    WakeError,
    make_template,
    read_header,
)
from ttci.infra.db import Store, now
from ttci.model.arch import Arch
from ttci.model.errors import TTError
from ttci.wire.warm import MISS_REASONS

__all__ = [
    "SELFTEST_TRIES",
    "TEMPLATE_FORMAT",
    "WAKE_TIMEOUT_S",
    "Templates",
    "image_digest",
    "template_key",
]

log = logging.getLogger("hostd.vm.templates")
TEMPLATE_FORMAT = 2  # bump when what a template holds changes: every old one goes stale
# 2: x86 templates have a VM generation ID (clones get their own)
RETRY_FAILED_S = 600.0


def template_key(spec: TemplateSpec, qemu: int) -> str:
    """Everything a template's memory state depends on, hashed."""
    row = Arch.parse(spec.image.manifest.arch).row
    what = [TEMPLATE_FORMAT, image_digest(spec.image), spec.vcpus, spec.memory_mib]
    what += [spec.disk_gib, spec.accel, qemu, row.machine, row.cpu, list(row.libvirt_qemu_args)]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _qemu_text(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


@dataclass(frozen=True)
class Pick:
    """The outcome of looking for a template: a row to restore from, or why there is none."""

    row: dict[str, Any] | None
    reason: str = ""  # one of MISS_REASONS when row is None
    why: str = ""  # the words for people


class Templates:
    """hostd's templates (rows in its state, files under root). Thread-safe."""

    def __init__(
        self,
        store: Store,
        root: Path,
        host_id: str,
        engine: Engine | None,
        *,
        enabled: bool = True,
        volumes: Volumes | None = None,
    ) -> None:
        """engine None: state and files only (the CLI on the host: list, prune). volumes: the
        disks' storage (None: the backend hostd last recorded)."""
        self.store = store
        self.volumes = volumes or Volumes.recorded(store)
        self.root = root
        self.host_id = host_id
        self.engine = engine
        self.enabled = enabled
        self.hits = 0
        self.misses: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()
        self._queue: queue.Queue[tuple[TemplateSpec, str] | None] = queue.Queue()
        self._queued: set[str] = set()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._headers: dict[str, SaveHeader] = {}
        self._qemu: int | None = None
        self.spares = Spares()  # save file copies ready for clones (hostd/vm/spares.py)

    # -- state -------------------------------------------------------------------------------
    def rows(self, where: str | None = None, args: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("templates").rows_where(where, args or []))

    def selftests(self) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("restore_tests").rows)

    def _update(self, tid: str, **fields: Any) -> None:
        with self.store.lock:
            self.store.db.table("templates").update(tid, fields)

    def disk_bytes(self) -> int:
        rows = [r for r in self.rows() if r["state"] != "failed"]
        spare = self.spares.disk_bytes([Path(r["dir"]) for r in rows])
        return spare + sum(int(r["bytes"] or 0) for r in rows)

    def _eng(self) -> Engine:
        if self.engine is None:
            raise TemplateError("templates are made and restored by hostd, not here")
        return self.engine

    def qemu(self) -> int:
        if self._qemu is None:
            self._qemu = self._eng().qemu_version()
        return self._qemu

    def key(self, spec: TemplateSpec) -> str:
        return template_key(spec, self.qemu())

    # -- pick --------------------------------------------------------------------------------
    def pick(self, spec: TemplateSpec, cold: bool = False) -> Pick:
        """The ready template for spec, or why not (counted as a miss by the caller's result).
        cold: the request asked for a cold boot."""
        if not self.enabled:
            return Pick(None, "off", "warm start is off on this host (hostd --no-warm)")
        if cold:
            return Pick(None, "asked", "the request asked for a cold boot")
        if spec.image.manifest.profile != "agent":
            return Pick(None, "profile", f"profile {spec.image.manifest.profile} boots cold")
        arch, qemu = spec.image.manifest.arch, self.qemu()
        test_row = self._selftest(spec)
        if test_row is not None and not test_row["ok"]:
            return Pick(
                None,
                "selftest_failed",
                f"restore self-test failed for {arch} on QEMU {_qemu_text(qemu)}: "
                + test_row["detail"],
            )
        rows = self.rows("key = ?", [self.key(spec)])
        for r in rows:
            if r["state"] == "ready":
                return Pick(r)
        for r in rows:
            if r["state"] == "building":
                return Pick(None, "building", "its template is being made")
            if r["state"] == "failed":
                reason = "old_agent" if "predates warm start" in r["error"] else "template_failed"
                return Pick(None, reason, f"its template failed: {r['error']}")
        return Pick(None, "no_template", "no template yet")

    def _selftest(self, spec: TemplateSpec) -> dict[str, Any] | None:
        """The recorded restore self-test of spec's (architecture, QEMU, accelerator)."""
        target = target_of(spec.image.manifest.arch, self.qemu(), spec.accel)
        with self.store.lock:
            rows = list(self.store.db.table("restore_tests").rows_where("target = ?", [target]))
        return rows[0] if rows else None

    def count(self, pick: Pick, warm: bool, why: str = "") -> None:
        """Count a VM's start: a hit, or a miss with its reason."""
        with self._lock:
            if warm and pick.row is not None:
                self.hits += 1
                self.spares.want(Path(pick.row["dir"]))  # the next clone's copy
                with self.store.lock:
                    self.store.db.execute(
                        "update templates set hits = hits + 1 where id = ?", [pick.row["id"]]
                    )
            else:
                self.misses[pick.reason if not why else "restore_failed"] += 1

    def restore_failed(self, row: dict[str, Any], e: TTError) -> str:
        """A VM's restore from row failed (it boots cold); returns the words for its row.

        A guest that never woke is its architecture's failure (the self-test passed by luck:
        QEMU 7.2's ppc64 and riscv64 restores hang most of the time), so that architecture's
        VMs boot cold from now on. Anything else is this template's: it is made anew."""
        if isinstance(e, WakeError):
            target = target_of(row["arch"], row["qemu"], row["accel"])
            with self.store.lock:
                self.store.db.table("restore_tests").upsert(
                    {
                        "target": target,
                        "arch": row["arch"],
                        "qemu": row["qemu"],
                        "accel": row["accel"],
                        "ok": 0,
                        "detail": f"a VM's restore failed after the self-test: {e.message[:300]}",
                        "tested_at": now(),
                    },
                    pk="target",
                )
        else:
            with contextlib.suppress(sqlite_utils.db.NotFoundError):
                self._update(row["id"], state="stale")  # deleted once no clone uses it
            self.collect()
        return f"restore failed, booted cold: {e.message}"[:500]

    def header(self, row: dict[str, Any]) -> SaveHeader:
        with self._lock:
            if row["id"] not in self._headers:
                self._headers[row["id"]] = read_header(Path(row["dir"]) / SAVE_FILE)
            return self._headers[row["id"]]

    # -- make --------------------------------------------------------------------------------
    def want(self, spec: TemplateSpec) -> None:
        """Make spec's template in the background (one build at a time), unless it exists or
        failed recently."""
        if not self.enabled or spec.image.manifest.profile != "agent":
            return
        key = self.key(spec)
        for r in self.rows("key = ?", [key]):
            if r["state"] in ("ready", "building"):
                return
            if r["state"] == "failed" and _age_s(r["created_at"]) < RETRY_FAILED_S:
                return
        with self._lock:
            if key in self._queued or self._stop.is_set():
                return
            self._queued.add(key)
            self._queue.put((spec, key))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="templates", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            spec, key = item
            try:
                self.make(spec)
            except TTError as e:
                log.warning("template of %s not made: %s", spec.image.name, e)
            except Exception:
                log.exception("template of %s failed unexpectedly", spec.image.name)
            finally:
                with self._lock:
                    self._queued.discard(key)

    def make(self, spec: TemplateSpec) -> dict[str, Any]:
        """Make spec's template now (or return the ready one); self-test restore for its
        architecture once. Raises TemplateError (recorded in the row) when it fails."""
        with self._build_lock:
            key = self.key(spec)
            ready = self.rows("key = ? and state = 'ready'", [key])
            if ready:
                return ready[0]
            test = self._selftest(spec)
            if test is not None and not test["ok"]:
                raise TemplateError(
                    f"restore does not work for {spec.image.manifest.arch} on this host's QEMU: "
                    + test["detail"],
                    hint="its VMs boot cold",
                )
            for r in self.rows("key = ? and state = 'failed'", [key]):
                self._remove(r)
            row = self._record(spec, key)
            domain, vol = row["domain"], template_volume(row["id"])
            try:
                if self._stop.is_set():
                    raise TemplateError("hostd is stopping")
                boot_s = make_template(
                    self._eng(),
                    spec,
                    Path(row["dir"]),
                    name=row["domain"],
                    token=row["token"],
                    meta=self._meta(row),
                    alive=lambda: not self._stop.is_set() and self._eng().is_running(domain),
                    make_disk=lambda dest: self.volumes.clone(
                        image_source(self.volumes, spec.image),
                        vol,
                        kind="template",
                        owner=f"template:{row['id']}",
                        dest=dest,
                        size_gib=spec.disk_gib,
                    ),
                    freeze=lambda: self.volumes.freeze(vol),
                )
                self._update(
                    row["id"],
                    boot_s=round(boot_s, 3),
                    bytes=dir_bytes(Path(row["dir"]), self.volumes, row["id"]),
                )
                self._self_test_once(self.rows("id = ?", [row["id"]])[0])
            except TTError as e:
                if self._stop.is_set():
                    self._remove(row)  # not the template's fault: made again next time
                else:
                    self._fail(row, e)
                raise
            self._update(row["id"], state="ready")
            self.spares.want(Path(row["dir"]))
            log.info("template %s of %s ready", row["id"], spec.image.name)
            self.collect()
            return self.rows("id = ?", [row["id"]])[0]

    def _record(self, spec: TemplateSpec, key: str) -> dict[str, Any]:
        tid = uuid.uuid4().hex[:10]
        row = {
            "id": tid,
            "key": key,
            "image": spec.image.name,
            "image_digest": image_digest(spec.image),
            "arch": spec.image.manifest.arch,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "disk_gib": spec.disk_gib,
            "accel": spec.accel,
            "qemu": self.qemu(),
            "state": "building",
            "dir": str(self.root / tid),
            "domain": f"tt-{self.host_id}-tpl-{tid}",
            "token": secrets.token_hex(16),
            "bytes": 0,
            "boot_s": 0.0,
            "error": "",
            "hits": 0,
            "created_at": now(),
        }
        with self.store.lock:
            self.store.db.table("templates").insert(row)
        return row

    def _meta(self, row: dict[str, Any], role: str = "template") -> dict[str, str]:
        return {"host": self.host_id, "vm": f"{role}-{row['id']}", "template": row["id"]}

    def _fail(self, row: dict[str, Any], e: TTError) -> None:
        """Keep the row (so pick says why), drop everything else of the template."""
        self._destroy_files(row)
        with contextlib.suppress(sqlite_utils.db.NotFoundError):
            self._update(row["id"], state="failed", error=e.message[:500], bytes=0)

    # -- restore self-test -------------------------------------------------------------------
    def _self_test_once(self, row: dict[str, Any]) -> None:
        result = selftest_once(
            self.store, self._eng(), self.host_id, row, self.header(row), self._stop, self.volumes
        )
        if result is not None and not result.ok:
            raise TemplateError(f"restore self-test failed: {result.detail}")

    # -- remove ------------------------------------------------------------------------------
    def _users(self, tid: str) -> int:
        with self.store.lock:
            return int(
                self.store.db.table("vms").count_where("template = ? and state != 'lost'", [tid])
            )

    def collect(self, images: list[Image] | None = None) -> list[dict[str, Any]]:
        """Mark templates stale whose image is gone or rebuilt or whose QEMU changed; delete
        stale ones no VM uses any more. images: what the host has now (None: no image check).
        Returns the rows deleted."""
        current = {i.name: image_digest(i) for i in images} if images is not None else None
        qemu = self._qemu
        removed = []
        for r in self.rows("state in ('ready', 'stale')"):
            gone = current is not None and current.get(r["image"]) != r["image_digest"]
            if gone or (qemu is not None and r["qemu"] != qemu) or r["state"] == "stale":
                if self._users(r["id"]):
                    if r["state"] != "stale":
                        self._update(r["id"], state="stale")
                    continue
                self._remove(r)
                removed.append(r)
        return removed

    def remove_image(self, image_name: str) -> int:
        """Drop every template of an image (those in use once their VMs are gone)."""
        n = 0
        for r in self.rows("image = ? and state != 'building'", [image_name]):
            self._update(r["id"], state="stale")
            n += 1
        self.collect()
        return n

    def _destroy_files(self, row: dict[str, Any]) -> None:
        if row["domain"]:  # the template's domain and its self-test clones' (selftest.py)
            for name in [row["domain"], *(f"{row['domain']}-t{n}" for n in range(SELFTEST_TRIES))]:
                with contextlib.suppress(TTError):
                    if self.engine is not None:
                        self.engine.destroy(name)
        for n in range(SELFTEST_TRIES):  # clones' disks first: the template's is their source
            self.volumes.destroy(template_volume(row["id"], n))
        self.volumes.destroy(template_volume(row["id"]))
        directory = Path(row["dir"])
        if directory.is_relative_to(self.root):
            for d in directory.glob("st[0-9]*"):
                shutil.rmtree(d, ignore_errors=True)
            if directory.exists():
                for f in directory.iterdir():
                    with contextlib.suppress(OSError):
                        f.chmod(0o644)
            shutil.rmtree(directory, ignore_errors=True)
        with self._lock:
            self._headers.pop(row["id"], None)

    def _remove(self, row: dict[str, Any]) -> None:
        log.info("removing template %s of %s (%s)", row["id"], row["image"], row["state"])
        self._destroy_files(row)
        with self.store.lock:
            self.store.db.table("templates").delete_where("id = ?", [row["id"]])

    # -- restart and shutdown ----------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """After a start: templates half made by a dead hostd go; so do files no row owns."""
        counts = {"templates_cleaned": 0, "templates_reaped": reap_parts(self.root)}
        for r in self.rows("state = 'building'"):
            self._remove(r)
            counts["templates_cleaned"] += 1
        known = {r["id"] for r in self.rows()}
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name not in known:
                    self._destroy_files({"id": d.name, "dir": str(d), "domain": ""})
                    counts["templates_reaped"] += 1
        for r in self.rows("state in ('ready', 'stale')"):
            if not (Path(r["dir"]) / SAVE_FILE).is_file():
                self._remove(r)
                counts["templates_cleaned"] += 1
        return counts

    def shutdown(self) -> None:
        """Stop making templates; one half made is removed (its domain first, so a waiting
        build step fails at once)."""
        self._stop.set()
        self._queue.put(None)
        self.spares.stop()
        for r in self.rows("state = 'building'"):
            with contextlib.suppress(TTError):
                self._eng().destroy(r["domain"])
        worker = self._worker
        if worker is not None:
            worker.join(timeout=60)
        for r in self.rows("state = 'building'"):
            self._remove(r)

    # -- reports -----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """For /v1/host, `tt image list` and /metrics: templates, self-tests, hits and misses."""
        return {
            "enabled": self.enabled,
            "templates": [
                {k: r[k] for k in r if k not in ("token", "dir", "domain", "key", "image_digest")}
                for r in self.rows()
            ],
            "selftests": [
                {**t, "qemu": _qemu_text(t["qemu"]), "ok": bool(t["ok"])} for t in self.selftests()
            ],
            "bytes": self.disk_bytes(),
            "hits": self.hits,
            "misses": {r: self.misses.get(r, 0) for r in MISS_REASONS},
        }


def _age_s(iso: str) -> float:
    try:
        return (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(iso)).total_seconds()
    except ValueError:
        return RETRY_FAILED_S
