"""The cache store on both storage backends for real (qcow2 files; ZFS snapshot, clone and
promote on a zfs-fuse pool): versions, clones, last writer wins, discard, eviction, deletion and
recovery after a crash, checked on the disks themselves (qemu-io) and on the pool's datasets."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.cache.store import MAX_CHAIN, CacheStore, migrations
from hostd.storage.qcow2 import Qcow2Backend
from hostd.storage.volumes import Volumes, make_backend
from tests.zfsutil import zfs_pool
from ttci.infra.db import Store
from ttci.model.cache import CacheScope

SCOPE = CacheScope("ci", "gitlab:g/p", "deps")
OTHER = CacheScope("ci", "gitlab:g/other", "deps")


@pytest.fixture(params=["qcow2", "zfs"])
def caches(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheStore]:
    store = Store(tmp_path / "hostd.db", [*Volumes.migrations(), *migrations()])
    if request.param == "qcow2":
        yield CacheStore(store, Volumes(store, Qcow2Backend()), tmp_path / "caches", 1 << 40)
        return
    with zfs_pool(tmp_path) as dataset:
        backend = make_backend(f"zfs:{dataset}")
        backend.check()
        yield CacheStore(store, Volumes(store, backend), tmp_path / "caches", 1 << 40)


def _io(disk: Path, cmd: str) -> bool:
    got = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)], capture_output=True, text=True
    )
    return got.returncode == 0 and "Pattern verification failed" not in got.stdout


def _fs(disk: Path) -> bool:
    """The disk holds the empty ext4 (its superblock magic 0xEF53 at byte 1080)."""
    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -v 1080 2", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[1:3] == ["53", "ef"]


def _write(caches: CacheStore, vm: str, byte: int, commit: bool, at: str = "1G") -> None:
    clone = caches.checkout(vm, SCOPE, "/cache")
    assert _io(clone.path, f"write -P {byte} {at} 64k")
    caches.release(vm, commit)


def test_a_version_is_cloned_committed_and_the_later_commit_wins(caches: CacheStore) -> None:
    first = caches.checkout("vm1", SCOPE, "/cache")
    assert _fs(first.path)  # empty the first time: a fresh file system
    assert caches.clone_of("vm1") == first
    assert _io(first.path, "write -P 0x11 1G 64k")
    caches.release("vm1", commit=True)
    a, b = caches.checkout("a", SCOPE, "/cache"), caches.checkout("b", SCOPE, "/cache")
    for c in (a, b):
        assert _io(c.path, "read -P 0x11 1G 64k")  # both see version 1
    assert _io(a.path, "write -P 0x22 1G 64k") and _io(b.path, "write -P 0x33 1G 64k")
    caches.release("a", commit=True)
    caches.release("b", commit=True)  # the later commit wins
    c = caches.checkout("c", SCOPE, "/cache")
    assert _io(c.path, "read -P 0x33 1G 64k")
    caches.release("c", commit=False)
    assert [(r["version"], r["hits"], r["misses"], r["commits"]) for r in caches.listing()] == [
        (3, 3, 1, 3)
    ]
    # only the newest version is live; no clone (on qcow2 the versions under it stay, doomed,
    # until a commit flattens the chain; on ZFS they are gone, datasets too)
    live = [v["name"] for v in caches.volumes.rows("kind = 'cache' and state != 'doomed'")]
    assert live == [b.volume]
    names = caches.volumes.backend.names()
    assert {n for n in names if n.startswith("cache-")} <= {b.volume}


def test_the_chain_under_a_clone_stays_short(caches: CacheStore) -> None:
    for n in range(2 * MAX_CHAIN + 1):
        _write(caches, f"vm{n}", 0x10 + n, commit=True, at=f"{n}G")
        assert len(caches.volumes.rows("kind = 'cache'")) <= MAX_CHAIN
    clone = caches.checkout("last", SCOPE, "/cache")
    for n in range(2 * MAX_CHAIN + 1):  # every version's writes, through the chain
        assert _io(clone.path, f"read -P {0x10 + n} {n}G 64k")
    caches.release("last", commit=False)


def test_a_discarded_clone_never_shows_and_projects_never_share(caches: CacheStore) -> None:
    _write(caches, "vm1", 0x11, commit=True)
    _write(caches, "vm2", 0x44, commit=False)  # a failed job
    clone = caches.checkout("vm3", SCOPE, "/cache")
    assert _io(clone.path, "read -P 0x11 1G 64k")
    other = caches.checkout("vm4", OTHER, "/cache")
    assert _fs(other.path) and not _io(other.path, "read -P 0x11 1G 64k")  # empty, not ours
    caches.release("vm3", commit=False)
    caches.release("vm4", commit=False)


def test_eviction_takes_whole_unused_caches_oldest_first(caches: CacheStore) -> None:
    _write(caches, "vm1", 0x11, commit=True)
    time.sleep(0.01)
    busy = caches.checkout("vm2", OTHER, "/cache")  # in use: never evicted
    assert _io(busy.path, "write -P 0x22 1G 8M")
    caches.limit_bytes = 1  # nothing fits now
    assert caches.evict() == [SCOPE.scope_id]
    assert {r["project"] for r in caches.listing()} == {"gitlab:g/other"}
    assert caches.stats()["evictions"] == 1
    caches.release("vm2", commit=True)  # committing over the limit evicts it as well
    assert caches.listing() == []
    assert caches.volumes.rows("kind = 'cache'") == []


def test_deleting_a_cache_in_use_discards_its_clone_at_the_end(caches: CacheStore) -> None:
    _write(caches, "vm1", 0x11, commit=True)
    caches.checkout("vm2", SCOPE, "/cache")
    assert caches.drop(SCOPE.scope_id)
    caches.release("vm2", commit=True)  # the cache is gone: nothing to commit into
    assert caches.listing() == [] and caches.volumes.rows("kind = 'cache'") == []
    assert not caches.drop(SCOPE.scope_id)


def test_reconcile_after_a_crash_drops_clones_of_gone_vms(caches: CacheStore) -> None:
    _write(caches, "vm1", 0x11, commit=True)
    caches.checkout("gone", SCOPE, "/cache")
    caches.checkout("alive", SCOPE, "/cache")
    with caches.store.lock:  # a clone recorded, its volume never made (hostd died in between)
        caches.store.db.table("cache_clones").insert(
            {"volume": "cache-half", "scope_id": SCOPE.scope_id, "vm": "half", "mount": "/c",
             "created_at": 0.0}
        )  # fmt: skip
    (caches.root / ".empty-16g.raw.tmp").write_bytes(b"cut short")
    assert caches.reconcile({"alive", "half"}) == 2
    assert not list(caches.root.glob(".*.tmp"))
    assert [c["vm"] for c in caches.store.db.table("cache_clones").rows] == ["alive"]
    caches.release("alive", commit=False)
    assert len(caches.volumes.rows("kind = 'cache'")) == 1  # the committed version
