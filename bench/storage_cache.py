"""The cache half of bench/storage.py: cache volumes per storage backend.

- On the host, through hostd's own cache store (no VM): attaching a 1 GB cache (a clone of its
  newest version: median of --runs), committing 1 GB a job wrote into an empty cache, and
  committing small changes (16 MiB) made on top of a 1 GB version: on qcow2 a commit freezes
  the clone as an overlay (no copy) until MAX_CHAIN versions are stacked, then one commit
  flattens them (copies the 1 GB; its time is the last column); ZFS snapshots and promotes.
- With real VMs (amd64, TCG where KVM does not work), through hostd's VM manager: a job's
  dependency step fetches 300 MB of dependency files the way a package manager would (a
  tarball streamed into the VM and unpacked) unless its cache already has them (a lockfile
  hash it checks); then the job reads every file. Job 1 fills the cache and commits it, job 2
  finds them there, job 3 has no cache (the usual CI job). Goals: attach <= 1 s, job 2's
  dependency step >= 5x faster than job 3's.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hostd.cache.store import MAX_CHAIN, CacheStore, migrations
from hostd.storage.volumes import Volumes, make_backend
from hostd.vm.engine import Engine
from hostd.vm.libvirtd import PrivateLibvirtd
from hostd.vm.manager import HostConfig, VMManager
from ttci.infra.db import Store
from ttci.model.cache import CacheScope, parse_cache
from ttci.model.resources import Resources
from ttci.wire.envs import VMRequest

__all__ = ["CACHE_COLUMNS", "DEPS_MB", "cache_rows", "cache_volumes"]

SCOPE = CacheScope("bench", "user:bench", "deps")
DEPS_MB = 300
FILE_KIB = 256
MEMORY_MIB = 512
# The dependency step: a package manager's "is the lockfile's set installed?" check...
CHECK = '[ "$(cat "$1/.lock" 2>/dev/null)" = "$2" ]'
# ... and, when it is not, the download (stdin) unpacked where the dependencies live.
FETCH = 'mkdir -p "$1" && tar -xf - -C "$1" && printf %s "$2" > "$1/.lock"'
READ = 'find "$1" -type f -name "*.whl" -exec cat {} + | wc -c'
CACHE_COLUMNS = [
    "backend",
    "attach 1 GB",
    "commit 1 GB",
    "commit small on 1 GB",
    "commit that flattens",
    "dep step: cold / no cache / cached",
    "speed-up",
    "read 300 MB: no cache / cached",
    "job commit",
]


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _qemu_io(disk: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)], check=True, capture_output=True
    )


# -- on the host -------------------------------------------------------------------------------
def host_numbers(spec: str, state: Path, runs: int) -> dict[str, Any]:
    """Attach and commit times of a 1 GB cache through the cache store."""
    store = Store(state / "hostd.db", [*Volumes.migrations(), *migrations()])
    backend = make_backend(spec)
    backend.check()
    caches = CacheStore(store, Volumes(store, backend), state / "caches", 1 << 40)
    fill = caches.checkout("fill", SCOPE, "/cache")
    _qemu_io(fill.path, "write -P 0x5a 1G 1G")  # 1 GB a job wrote (past the fs metadata)
    commit_1g, _ = _timed(lambda: caches.release("fill", commit=True))
    attach = []
    for n in range(runs):
        t, _ = _timed(lambda n=n: caches.checkout(f"a{n}", SCOPE, "/cache"))
        attach.append(t)
        caches.release(f"a{n}", commit=False)
    small = []  # 16 MiB changes on the 1 GB version, committed one after another: on qcow2
    for n in range(MAX_CHAIN):  # the last of them flattens the chain (copies the 1 GB)
        c = caches.checkout(f"s{n}", SCOPE, "/cache")
        _qemu_io(c.path, f"write -P 0x6b {3 + n}G 16M")
        small.append(_timed(lambda n=n: caches.release(f"s{n}", commit=True))[0])
    for v in caches.volumes.rows("kind = 'cache'"):
        caches.volumes.destroy(v["name"])
    return {
        "attach_1g_s": [round(x, 4) for x in attach],
        "attach_1g_median_s": round(sorted(attach)[len(attach) // 2], 4),
        "commit_1g_s": round(commit_1g, 3),
        "commit_small_on_1g_s": round(small[0], 3),
        "commit_flatten_1g_s": round(max(small), 3),
    }


# -- with real VMs -----------------------------------------------------------------------------
def deps_tarball() -> tuple[bytes, str]:
    """DEPS_MB of dependency files (incompressible, like wheels), and their lockfile hash."""
    rnd = random.Random(42)  # noqa: S311 - test data, not secrets
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n in range(DEPS_MB * 1024 // FILE_KIB):
            data = rnd.randbytes(FILE_KIB << 10)
            info = tarfile.TarInfo(f"pkg{n // 40:03d}/dist-{n:05d}.whl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()[:16]


def _chunks(blob: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


def _sh(mgr: VMManager, vm: str, script: str, *args: str, stdin: Any = None) -> tuple[int, str]:
    st, out, err = mgr.agent(vm).output(
        ["/bin/sh", "-c", script, "job", *args], stdin=stdin, timeout=1800
    )
    assert st.code in (0, 1), (script, st, err[-500:])
    return st.code or 0, out.decode()


def one_job(mgr: VMManager, image: str, cached: bool, blob: bytes, lock: str) -> dict[str, Any]:
    """A job: its dependency step (check, fetch if missing) and a read of every file."""
    vm = uuid.uuid4().hex[:8]
    where = "/cache/deps" if cached else "/root/deps"
    cache = parse_cache("deps:/cache") if cached else None
    req = VMRequest(vm, "bench", f"c-{vm}", "bench", image, memory_mib=MEMORY_MIB, cache=cache)
    boot, _ = _timed(lambda: mgr.create(req))
    t0 = time.perf_counter()
    hit = _sh(mgr, vm, CHECK, where, lock)[0] == 0
    if not hit:
        _sh(mgr, vm, FETCH, where, lock, stdin=_chunks(blob))
    step = time.perf_counter() - t0
    read, (_, out) = _timed(lambda: _sh(mgr, vm, READ, where))
    assert int(out) == DEPS_MB << 20, out
    commit, _ = _timed(lambda: mgr.delete(vm, commit_cache=cached))
    return {"hit": hit, "boot_s": boot, "step_s": step, "read_s": read, "delete_s": commit}


def job_numbers(spec: str, state: Path, image_path: Path, image: str) -> dict[str, Any]:
    blob, lock = deps_tarball()
    make_backend(spec).check()  # ZFS: its mounts shared before the private libvirtd starts
    libvirtd = PrivateLibvirtd(state / "libvirt")
    libvirtd.start()
    cfg = HostConfig(
        "bcache", image_path, state / "hostd", Resources(4, 8192, 100), warm=False, storage=spec
    )
    mgr = VMManager(cfg, Engine(libvirtd.uri))
    try:
        first = one_job(mgr, image, True, blob, lock)  # fills the cache, commits it
        second = one_job(mgr, image, True, blob, lock)  # finds them there
        plain = one_job(mgr, image, False, blob, lock)  # no cache: fetches every time
    finally:
        mgr.shutdown(keep_vms=False)
        libvirtd.stop()
    assert not first["hit"] and second["hit"] and not plain["hit"]
    return {
        "first": _rounded(first),
        "second": _rounded(second),
        "no_cache": _rounded(plain),
        "speedup": round(plain["step_s"] / second["step_s"], 1),
    }


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


# -- the section -------------------------------------------------------------------------------
def cache_volumes(spec: str, state: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cache volumes on the backend: attach and commit on the host; the 300 MB job with VMs
    (unless --boots 0)."""
    state.mkdir(parents=True, exist_ok=True)
    out = host_numbers(_own(spec, "ttch"), state / "host", max(args.runs // 2, 3))
    if args.boots:
        image = "qemu:debian-12:amd64"
        out["jobs"] = job_numbers(_own(spec, "ttcv"), state / "vm", args.image_path, image)
    return out


def _own(spec: str, name: str) -> str:
    """A dataset of its own on ZFS (a dataset belongs to one hostd state dir)."""
    if not spec.startswith("zfs:"):
        return spec
    dataset = f"{spec.removeprefix('zfs:').split('/')[0]}/{name}"
    subprocess.run(["zfs", "create", "-p", dataset], check=True, capture_output=True)
    return f"zfs:{dataset}"


def cache_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    base = results.get("qcow2", {}).get("cache", {})

    def vs(kind: str, value: float, key: str) -> str:
        ref = base.get(key)
        return f" ({value / ref:.2f}x)" if ref and kind != "qcow2" else ""

    rows = []
    for kind, res in results.items():
        c = res.get("cache") or {}
        if not c:
            continue
        attach = c["attach_1g_median_s"]
        row = [
            kind,
            f"{attach * 1000:.0f} ms{vs(kind, attach, 'attach_1g_median_s')}",
            f"{c['commit_1g_s']:.2f} s{vs(kind, c['commit_1g_s'], 'commit_1g_s')}",
            f"{c['commit_small_on_1g_s']:.2f} s"
            + vs(kind, c["commit_small_on_1g_s"], "commit_small_on_1g_s"),
            f"{c['commit_flatten_1g_s']:.2f} s"
            + vs(kind, c["commit_flatten_1g_s"], "commit_flatten_1g_s"),
        ]
        j = c.get("jobs")
        if j:
            row += [
                f"{j['first']['step_s']:.1f} / {j['no_cache']['step_s']:.1f} / "
                f"{j['second']['step_s']:.2f} s",
                f"{j['speedup']:.0f}x",
                f"{j['no_cache']['read_s']:.1f} / {j['second']['read_s']:.1f} s",
                f"{j['first']['delete_s']:.1f} s",
            ]
        else:
            row += ["-"] * 4
        rows.append(row)
    return rows
