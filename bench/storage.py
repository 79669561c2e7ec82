"""Storage backends: VM disks (and cache volumes) on qcow2 overlays, ZFS clones, reflink copies.

    python -m bench.storage [--backends qcow2,zfs,reflink] [--runs 20] [--boots 3] [--json F]

Per backend, in a throw-away state directory (ZFS: a zfs-fuse pool on a sparse file; reflink: a
btrfs on a loop-mounted file; both made and removed by tests/zfsutil.py; kernel OpenZFS would be
faster than zfs-fuse):

- VM disks (`vm_disk_*`): importing the image once (ZFS copies it into a dataset), then `--runs`
  VM disks made from it and destroyed, each timed (median), through hostd's own Volumes; and
  `--boots` cold boots of a real VM (amd64; TCG where KVM does not work) through hostd's VM
  manager, from the create request to the agent's first answer (median).
- Cache volumes (`cache`): bench/storage_cache.py (attach and commit a 1 GB cache; a job that
  fetches 300 MB of dependency files, then one that finds them in its cache, then one without).

Every number is also shown as a ratio to qcow2 measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from bench.storage_cache import CACHE_COLUMNS, DEPS_MB, cache_rows, cache_volumes
from hostd.images.catalogue import Image, scan
from hostd.storage.volumes import Volumes, make_backend
from hostd.vm.disk import image_source, vm_disk
from hostd.vm.engine import Engine
from hostd.vm.libvirtd import PrivateLibvirtd, become_subreaper
from hostd.vm.manager import HostConfig, VMManager
from hostd.vm.schema import open_store
from tests.zfsutil import btrfs_dir, zfs_pool
from ttci.infra.log import setup_logging
from ttci.model.resources import Resources
from ttci.wire.envs import VMRequest

IMAGE = "qemu:debian-12:amd64"
MEMORY_MIB = 512


# -- backends ----------------------------------------------------------------------------------
@contextlib.contextmanager
def storage(kind: str, tmp: Path) -> Iterator[str]:
    """The --storage value of a backend, with what it needs made for the run (and removed)."""
    if kind == "zfs":
        with zfs_pool(tmp, size="8G") as dataset:
            yield f"zfs:{dataset}"
    elif kind == "reflink":
        with btrfs_dir(tmp, size="8G") as directory:
            yield f"reflink:{directory}"
    else:
        yield kind


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- VM disks ----------------------------------------------------------------------------------
def vm_disks(spec: str, state: Path, image: Image, runs: int) -> dict[str, Any]:
    """Import the image once, then make and destroy `runs` VM disks (seconds each)."""
    backend = make_backend(spec)
    backend.check()
    vols = Volumes(open_store(state), backend)
    work = state / "disks"
    work.mkdir(parents=True)
    imported = timed(lambda: image_source(vols, image))
    disk_gib = max(1, image.manifest.disk_virtual_size >> 30)
    made, gone = [], []
    for n in range(runs):
        t0 = time.perf_counter()
        vm_disk(vols, f"b{n}", work / f"b{n}.qcow2", disk_gib, image=image)
        t1 = time.perf_counter()
        vols.destroy(f"vm-b{n}")
        made.append(t1 - t0)
        gone.append(time.perf_counter() - t1)
    vols.destroy(image_source(vols, image))  # the next phase starts from an empty dataset
    return {"import_s": imported, "create_s": made, "destroy_s": gone}


def boots(spec: str, state: Path, image_path: Path, image: Image, runs: int) -> list[float]:
    """Cold boots of a real VM on the backend: seconds from create to the agent's answer."""
    libvirtd = PrivateLibvirtd(state / "libvirt")
    libvirtd.start()
    cfg = HostConfig("bstor", image_path, state / "hostd", Resources(4, 8192, 100), warm=False)
    mgr = VMManager(HostConfig(**{**cfg.__dict__, "storage": spec}), Engine(libvirtd.uri))
    times = []
    try:
        mgr.reconcile()  # as tt-hostd serve does when it starts
        for _ in range(runs):
            vm_id = uuid.uuid4().hex[:8]
            req = VMRequest(
                vm_id, "bench", f"b-{vm_id}", "bench", image.name, memory_mib=MEMORY_MIB
            )
            t0 = time.monotonic()
            mgr.create(req)
            times.append(time.monotonic() - t0)
            st, _, _ = mgr.agent(vm_id).output(["true"])
            assert st.ok, st
            mgr.delete(vm_id)
    finally:
        mgr.shutdown(keep_vms=False)
        libvirtd.stop()
    return times


def vm_disk_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    base = results.get("qcow2", {})

    def cell(kind: str, key: str) -> str:
        m = results[kind][key]
        ref = base.get(key)
        return f"{m * 1000:.0f} ms" + (f" ({m / ref:.2f}x)" if ref and kind != "qcow2" else "")

    rows = []
    for kind, r in results.items():
        boot = f"{r['boot_median_s']:.2f} s" if r.get("boot_median_s") else "-"
        if base.get("boot_median_s") and kind != "qcow2" and r.get("boot_median_s"):
            boot += f" ({r['boot_median_s'] / base['boot_median_s']:.2f}x)"
        imp = f"{r['import_s']:.2f} s"
        rows.append(
            [kind, imp, cell(kind, "create_median_s"), cell(kind, "destroy_median_s"), boot]
        )
    return rows


# -- main --------------------------------------------------------------------------------------
def run_backend(kind: str, args: argparse.Namespace, image: Image) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix=f"tt-bench-storage-{kind}-", dir="/var/tmp") as tmp,
        storage(kind, Path(tmp)) as spec,
    ):
        d = vm_disks(spec, Path(tmp) / "disks", image, args.runs)
        out: dict[str, Any] = {
            "storage": spec,
            "import_s": round(d["import_s"], 3),
            "create_median_s": round(median(d["create_s"]), 4),
            "destroy_median_s": round(median(d["destroy_s"]), 4),
            "create_s": [round(x, 4) for x in d["create_s"]],
            "destroy_s": [round(x, 4) for x in d["destroy_s"]],
        }
        if args.boots:
            b = boots(spec, Path(tmp) / "boot", args.image_path, image, args.boots)
            out |= {"boot_s": [round(x, 3) for x in b], "boot_median_s": round(median(b), 3)}
        out["cache"] = cache_volumes(spec, Path(tmp) / "cache", args)
        print(kind, out, flush=True)
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="qcow2,zfs,reflink", help="of qcow2, zfs, reflink")
    p.add_argument("--runs", type=int, default=20, help="VM disks made and destroyed (median)")
    p.add_argument("--boots", type=int, default=3, help="cold boots per backend (0: none)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    args = p.parse_args()
    setup_logging()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    images = {i.name: i for i in scan(args.image_path)[0]}
    if IMAGE not in images:
        print(
            f"no {IMAGE} under {args.image_path} (tt image build debian-12:amd64)", file=sys.stderr
        )
        return 1
    become_subreaper()
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    results = {k: run_backend(k, args, images[IMAGE]) for k in kinds}
    print_table(
        f"VM disks per backend (create/destroy: median of {args.runs}; boot: create to the agent's "
        f"first answer, cold, median of {args.boots}; ratio to qcow2)",
        ["backend", "image import", "create disk", "destroy disk", "boot to agent"],
        vm_disk_rows(results),
    )
    rows = cache_rows(results)
    if rows:
        print_table(
            f"cache volumes per backend (attach: median; jobs: {DEPS_MB} MB of dependency files, "
            "cold = the job that fills the cache; speed-up of the dependency step, cached vs no "
            "cache; goals: attach <= 1 s, >= 5x)",
            CACHE_COLUMNS,
            rows,
        )
    write_json(args.json, {"backends": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
