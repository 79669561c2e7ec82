"""hostd/storage on real disks: the qcow2 backend and ZFS (zfs-fuse, a real pool on a file).

The same story runs on both: an image imported as a frozen volume, a VM disk cloned from it
(copy-on-write: the clone's writes never reach the image), a template disk frozen and cloned,
a volume with clones destroyed only once its last clone is gone, a cache-style commit that no
longer depends on its source, and a restart that reaps what a crash left.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.storage.base import StorageError, parse_storage
from hostd.storage.qcow2 import Qcow2Backend
from hostd.storage.reflink import ReflinkBackend
from hostd.storage.volumes import Volumes, make_backend
from hostd.storage.zfs import ZfsBackend
from tests.zfsutil import btrfs_dir, datasets, zfs_pool
from ttci.infra.db import Store
from ttci.model.errors import BadInput


@pytest.fixture(params=["qcow2", "zfs", "reflink"])
def vols(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Volumes]:
    store = Store(tmp_path / "hostd.db", Volumes.migrations())
    if request.param == "qcow2":
        yield Volumes(store, Qcow2Backend())
        return
    if request.param == "reflink":
        with btrfs_dir(tmp_path) as directory:
            backend = make_backend(f"reflink:{directory}")
            backend.check()
            yield Volumes(store, backend)
        return
    with zfs_pool(tmp_path) as dataset:
        backend = make_backend(f"zfs:{dataset}")
        backend.check()
        yield Volumes(store, backend)


def _io(disk: Path, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )


def _pattern(disk: Path, byte: int, offset: str = "0") -> bool:
    """Whether disk holds 64 KiB of byte at offset (qemu-io compares)."""
    got = _io(disk, f"read -P {byte} {offset} 64k")
    return got.returncode == 0 and "Pattern verification failed" not in got.stdout


def _image(tmp: Path) -> Path:
    base = tmp / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    assert _io(base, "write -P 0xaa 0 64k").returncode == 0
    base.chmod(0o444)
    return base


def _virtual_size(disk: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True, check=True
    )
    return int(json.loads(info.stdout)["virtual-size"])


def test_clones_are_copy_on_write_and_sources_outlive_their_clones(
    vols: Volumes, tmp_path: Path
) -> None:
    base = _image(tmp_path)
    img = vols.image("img-0123", base)
    assert vols.image("img-0123", base) == img  # imported once
    copies = vols.used_bytes(("image",))  # what hostd adds to its used disk
    copied = not isinstance(vols.backend, Qcow2Backend)  # qcow2 uses the image's own file
    assert copies > 0 if copied else copies == 0
    vm = vols.clone(img, "vm-a", kind="vm", owner="vm:a", dest=tmp_path / "a.qcow2", size_gib=2)
    assert (tmp_path / "a.qcow2").exists() and _pattern(tmp_path / "a.qcow2", 0xAA)
    assert _virtual_size(vm) == 2 << 30  # grown to the VM's disk size
    assert _io(tmp_path / "a.qcow2", "write -P 0xbb 0 64k").returncode == 0
    assert _pattern(base, 0xAA)  # the image never sees a clone's writes
    # a template: a clone, frozen, cloned again; it sees the template's writes
    tpl = vols.clone(img, "tpl-t", kind="template", owner="template:t", dest=tmp_path / "t.qcow2",
                     size_gib=1)  # fmt: skip
    assert _io(tpl, "write -P 0xcc 64k 64k").returncode == 0
    vols.freeze("tpl-t")
    clone = vols.clone("tpl-t", "vm-b", kind="vm", owner="vm:b", dest=tmp_path / "b.qcow2",
                       size_gib=1)  # fmt: skip
    assert _pattern(clone, 0xCC, "64k") and _pattern(clone, 0xAA)
    # the template has a clone: it is doomed, not destroyed, until the clone goes
    assert vols.destroy("tpl-t") is False
    assert _pattern(tmp_path / "b.qcow2", 0xCC, "64k")
    assert vols.destroy("vm-b") is True
    assert vols.get("tpl-t") is None and vols.get("vm-b") is None  # swept with its last clone
    assert not (tmp_path / "b.qcow2").exists() and not (tmp_path / "t.qcow2").exists()
    assert vols.destroy(img) is False  # vm-a still uses it: doomed
    assert vols.image("img-0123", base) == img  # wanted again before it went: it stays
    assert vols.destroy("vm-a") and vols.get(img)["state"] == "frozen"  # type: ignore[index]
    assert vols.destroy(img)
    assert vols.rows() == []
    assert base.exists() and _pattern(base, 0xAA)  # the image file is the catalogue's
    assert vols.backend.names() == set()  # no dataset (ZFS), no file (reflink) left
    if isinstance(vols.backend, ZfsBackend):
        assert datasets(vols.backend.dataset) == []  # nor a snapshot


def test_commit_makes_a_version_that_outlives_its_source(vols: Volumes, tmp_path: Path) -> None:
    """Cache-style: clone v1 into a job's volume, write, commit it as v2; v1 can then go while
    v2 and a clone of v1 taken earlier keep their data."""
    v1 = vols.create_empty("cache-v1", kind="cache", owner="cache:k", dest=tmp_path / "v1.qcow2",
                           size_gib=1)  # fmt: skip
    assert _io(v1, "write -P 0x11 0 64k").returncode == 0
    vols.commit("cache-v1")
    early = vols.clone("cache-v1", "job-1", kind="cache", owner="cache:k",
                       dest=tmp_path / "j1.qcow2", size_gib=1)  # fmt: skip
    job = vols.clone("cache-v1", "cache-v2", kind="cache", owner="cache:k",
                     dest=tmp_path / "v2.qcow2", size_gib=1)  # fmt: skip
    assert _io(job, "write -P 0x22 64k 64k").returncode == 0
    vols.commit("cache-v2")
    assert vols.get("cache-v2")["source"] == ""  # type: ignore[index]
    assert vols.destroy("cache-v1") is False  # job-1 still reads it
    assert vols.destroy("job-1") and vols.get("cache-v1") is None
    v2 = vols.path("cache-v2")
    assert _pattern(v2, 0x11) and _pattern(v2, 0x22, "64k")
    assert _pattern(early, 0x11) is False or not early.exists()
    assert vols.destroy("cache-v2") and vols.rows() == []
    assert vols.backend.names() == set()
    if isinstance(vols.backend, ZfsBackend):
        assert datasets(vols.backend.dataset) == []


def test_restart_reaps_half_made_orphaned_and_ownerless_volumes(
    vols: Volumes, tmp_path: Path
) -> None:
    base = _image(tmp_path)
    img = vols.image("img-0123", base)
    for n in ("keep", "gone"):
        vols.clone(img, f"vm-{n}", kind="vm", owner=f"vm:{n}", dest=tmp_path / f"{n}.qcow2",
                   size_gib=1)  # fmt: skip
    vols._record("vm-half", "vm", "vm:half", img, tmp_path / "half.qcow2")  # killed right here
    orphan = not isinstance(vols.backend, Qcow2Backend)  # qcow2: files live in their owners' dirs
    if isinstance(vols.backend, ZfsBackend):  # no row names it: a crash before the row's update
        subprocess.run(["zfs", "create", f"{vols.backend.dataset}/vm-orphan"], check=True)
    elif isinstance(vols.backend, ReflinkBackend):
        (vols.backend.root / "vm-orphan.qcow2").write_bytes(b"")
    counts = vols.reconcile({"vm": {"keep"}.__contains__, "image": {img}.__contains__})
    assert {r["name"] for r in vols.rows()} == {img, "vm-keep"}
    assert counts == {"volumes_cleaned": 2, "volumes_reaped": int(orphan), "volumes_forgotten": 0}
    assert _pattern(tmp_path / "keep.qcow2", 0xAA) and not (tmp_path / "gone.qcow2").exists()
    assert vols.backend.names() == (set() if not orphan else {img, "vm-keep"})
    if isinstance(vols.backend, ZfsBackend):
        names = datasets(vols.backend.dataset)
        assert sorted(n.rsplit("/", 1)[1] for n in names) == [f"{img}", f"{img}@{img}", "vm-keep"]


def _destroy_by_hand(dataset: str) -> None:
    """`zfs destroy -rf` as an operator would run it: zfs-fuse may call a dataset busy for a
    moment after its last file closed, so try again for up to 10 s."""
    for _ in range(100):
        r = subprocess.run(["zfs", "destroy", "-rf", dataset], capture_output=True, text=True)
        if r.returncode == 0:
            return
        assert "busy" in r.stderr, r.stderr
        time.sleep(0.1)
    raise AssertionError(f"{dataset} stayed busy: {r.stderr}")


def test_a_volume_removed_by_hand_is_forgotten_and_made_again(
    vols: Volumes, tmp_path: Path
) -> None:
    base = _image(tmp_path)
    img = vols.image("img-0123", base)
    if isinstance(vols.backend, ZfsBackend):
        _destroy_by_hand(f"{vols.backend.dataset}/{img}")
    elif isinstance(vols.backend, ReflinkBackend):
        vols.path(img).unlink()
    counts = vols.reconcile({"image": {img}.__contains__})
    assert counts["volumes_forgotten"] == int(vols.backend.lists_volumes)
    assert vols.image("img-0123", base) == img  # imported again
    disk = vols.clone(img, "vm-a", kind="vm", owner="vm:a", dest=tmp_path / "a.qcow2", size_gib=1)
    assert _pattern(disk, 0xAA)
    assert vols.destroy("vm-a") and vols.destroy(img) and vols.backend.names() == set()


def test_storage_settings_say_what_is_wrong(tmp_path: Path) -> None:
    assert parse_storage("qcow2") == ("qcow2", "")
    assert parse_storage("zfs:tank/tt") == ("zfs", "tank/tt")
    with pytest.raises(BadInput, match="not a storage backend") as e:
        parse_storage("btrfs:/srv")
    assert "qcow2" in (e.value.hint or "") and "zfs:POOL/DATASET" in (e.value.hint or "")
    with pytest.raises(BadInput, match="is not POOL/DATASET"):
        parse_storage("zfs:tank")  # the pool's root: TT wants a dataset of its own
    with zfs_pool(tmp_path) as dataset:
        with pytest.raises(BadInput, match="no ZFS pool ttnosuchpool") as e:
            ZfsBackend("ttnosuchpool/tt").check()
        assert "zpool create ttnosuchpool" in (e.value.hint or "")
        pool = dataset.split("/")[0]
        with pytest.raises(BadInput, match=f"has no dataset {pool}/missing") as e:
            ZfsBackend(f"{pool}/missing").check()
        assert f"zfs create -p {pool}/missing" in (e.value.hint or "")
        ZfsBackend(dataset).check()
        mnt = tmp_path / f"{pool}-mnt" / "tt"  # where tests/zfsutil.py mounts it
        assert mnt.stat().st_mode & 0o777 == 0o700  # VM disks: no other local user reads them
        ZfsBackend(dataset).claim("/var/lib/a")
        ZfsBackend(dataset).claim("/var/lib/a")  # the same hostd, restarted
        with pytest.raises(BadInput, match="belongs to the hostd with state dir /var/lib/a") as e:
            ZfsBackend(dataset).claim("/var/lib/b")  # it would reap a's datasets
        assert f"zfs inherit org.ttci:state {dataset}" in (e.value.hint or "")
        ZfsBackend(dataset).release("/var/lib/a")  # a stopped with no VM left
        ZfsBackend(dataset).claim("/var/lib/b")
    assert parse_storage("reflink:/srv/tt") == ("reflink", "/srv/tt")
    with pytest.raises(BadInput, match="not an absolute directory"):
        parse_storage("reflink:srv")
    with pytest.raises(BadInput, match="cannot share blocks between copies") as e:
        ReflinkBackend(str(tmp_path)).check()  # ext4: no reflinks
    assert "btrfs" in (e.value.hint or "")
    with btrfs_dir(tmp_path) as directory:
        ReflinkBackend(str(directory)).check()
        assert directory.stat().st_mode & 0o777 == 0o700
        ReflinkBackend(str(directory)).claim("/var/lib/a")
        with pytest.raises(BadInput, match="belongs to the hostd with state dir /var/lib/a"):
            ReflinkBackend(str(directory)).claim("/var/lib/b")
    with pytest.raises(StorageError, match="not valid"):
        Volumes(Store(tmp_path / "h.db", Volumes.migrations()), Qcow2Backend()).image(
            "A B", tmp_path
        )
