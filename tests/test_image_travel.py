"""Images travel: a host that lacks an image fetches it from a host that has it, through the
scheduler, verified before it is offered, resumable, paced.

Fast tests: pulls from a directory and through a real scheduler and a real hostd API (waitress on
loopback, small fake images): verification, a corrupted source refused and never offered, a
pull cut mid-file resumed with a Range request, the rate cap, local reuse by sha256, the trust
rules (a host bears its own token; no user but an admin), the pool's missing list. The e2e
test (tests/test_image_travel_e2e.py) does it with real daemons, a second host in a network
namespace and a real VM.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests

from hostd.images.catalogue import scan
from hostd.images.fetcher import PoolSource, order_wanted
from hostd.images.sources import DirSource, HttpSource, TransferCorrupt, TransferError
from hostd.images.transfer import pull, remove_partial
from hostd.service.api import create_app as hostd_app
from ttci.infra.web_server import make_server
from ttci.model.errors import BadInput
from ttci.model.manifest import MANIFEST_FILE, FileEntry, Manifest
from ttci.model.naming import ImageName
from ttci.scheduler.image_broker import missing_images, pool_images
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app as sched_app
from ttci.wire.hosts import HostRegistration

ADMIN = "admin-" + secrets.token_urlsafe(16)
JOIN = "join-" + secrets.token_urlsafe(16)
H1_TOKEN, H2_TOKEN = secrets.token_urlsafe(20), secrets.token_urlsafe(20)
NAME = "qemu:debian-12:amd64"


def make_image(root: Path, name: str = NAME, disk_mib: int = 6, seed: bytes = b"x") -> Manifest:
    """A whole image directory with random files (the catalogue checks sizes; a pull checks
    every sha256)."""
    d = root / ImageName.parse(name).dirname
    d.mkdir(parents=True)
    entries = {}
    for rel, size in (
        ("vmlinuz", 300_000),
        ("initrd.img", 200_000),
        ("disk.qcow2", disk_mib << 20),
    ):
        data = hashlib.shake_256(seed + rel.encode()).digest(size)
        (d / rel).write_bytes(data)
        entries[rel] = FileEntry(rel, size, hashlib.sha256(data).hexdigest())
    n = ImageName.parse(name)
    m = Manifest(
        name=name, os="debian", release=n.release, suite="bookworm", arch=n.arch.value,
        profile="agent", kernel_version="6.1.0", kernel_cmdline="root=/dev/vda",
        kernel=entries["vmlinuz"], initrd=entries["initrd.img"], disk=entries["disk.qcow2"],
        disk_virtual_size=4 << 30, built_at="2026-11-30T00:00:00+00:00", inputs_key="k1",
        agent_protocol=1, recipe="name: x\n", recipe_sha256="r" * 64,
    )  # fmt: skip
    (d / MANIFEST_FILE).write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    return m


def corrupt(path: Path, at: int = 1000) -> None:
    """Flip one byte, same size (the catalogue still offers it where it lies)."""
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


# -- from a directory --------------------------------------------------------------------------
def test_a_pulled_image_is_verified_whole_and_offered(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src)
    steps = []
    result = pull(dst, NAME, DirSource(src), digest=m.digest, on_progress=steps.append)
    (img,) = scan(dst)[0]
    assert img.name == NAME and img.manifest.digest == m.digest
    assert result.fetched == sum(f.size for f in m.files()) and not result.already
    d = dst / ImageName.parse(NAME).dirname
    assert (d / MANIFEST_FILE).read_bytes() == (src / d.name / MANIFEST_FILE).read_bytes()
    assert img.manifest.recipe == "name: x\n"  # a pulled image carries its recipe
    for f in m.files():
        assert (d / f.path).stat().st_mode & 0o777 == 0o444
    assert steps[-1].done == steps[-1].total == result.fetched
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith(".pull-")) == [
        ".pull-qemu_debian-12_amd64.lock"
    ]  # no staging left, only the (empty) lock file
    again = pull(dst, NAME, DirSource(src), digest=m.digest)
    assert again.already and again.fetched == 0


def test_a_corrupted_transfer_is_refused_and_never_offered(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src)
    corrupt(src / ImageName.parse(NAME).dirname / "disk.qcow2", at=3 << 20)
    assert [i.name for i in scan(src)[0]] == [NAME]  # the source still offers it
    with pytest.raises(TransferCorrupt, match=r"disk.qcow2 .* is not what the manifest says"):
        pull(dst, NAME, DirSource(src), digest=m.digest)
    assert scan(dst) == ([], [])
    staged = dst / ".pull-qemu_debian-12_amd64"
    assert not (staged / "disk.qcow2").exists() and not (staged / "disk.qcow2.part").exists()
    # A wrong manifest for the asked digest is refused before any byte moves.
    with pytest.raises(TransferCorrupt, match="digest"):
        pull(dst, NAME, DirSource(src), digest="0" * 64)
    assert remove_partial(dst) == [staged] and not staged.exists()


class _Cut(DirSource):
    """A directory source whose connection breaks after `cut` bytes of disk.qcow2, once."""

    def __init__(self, path: Path, cut: int) -> None:
        super().__init__(path)
        self.cut = cut
        self.offsets: list[int] = []

    def open(self, name: str, digest: str, rel: str, offset: int) -> Any:
        inner = super().open(name, digest, rel, offset)
        if rel != "disk.qcow2":
            return inner
        self.offsets.append(offset)
        source = self

        class _Ctx:
            def __enter__(self) -> Iterator[bytes]:
                chunks = inner.__enter__()

                def gen() -> Iterator[bytes]:
                    sent = 0
                    for c in chunks:
                        if source.cut and sent + len(c) > source.cut:
                            yield c[: source.cut - sent]
                            source.cut = 0
                            raise TransferError("connection reset (test)")
                        sent += len(c)
                        yield c

                return gen()

            def __exit__(self, *exc: object) -> None:
                inner.__exit__(*exc)

        return _Ctx()


def test_a_cut_connection_resumes_where_it_broke(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src)
    source = _Cut(src, cut=(2 << 20) + 12345)
    result = pull(dst, NAME, source, digest=m.digest)
    assert source.offsets == [0, (2 << 20) + 12345]
    assert result.resumed == (2 << 20) + 12345
    assert [i.manifest.digest for i in scan(dst)[0]] == [m.digest]


def test_a_killed_pull_resumes_from_its_staged_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src, disk_mib=8)

    def die(p: Any) -> None:
        if p.file == "disk.qcow2" and p.done > (1 << 20):
            raise KeyboardInterrupt  # as Ctrl-C or a kill would stop it

    with pytest.raises(KeyboardInterrupt):
        pull(dst, NAME, DirSource(src), digest=m.digest, rate=4 << 20, on_progress=die)
    assert scan(dst) == ([], [])  # half an image is never offered
    part = dst / ".pull-qemu_debian-12_amd64" / "disk.qcow2.part"
    staged = part.stat().st_size
    assert 0 < staged < m.disk.size
    result = pull(dst, NAME, DirSource(src), digest=m.digest)
    assert result.resumed >= staged and result.fetched == m.disk.size - staged
    # The resumed part's bytes were hashed again: a part damaged while it lay there is caught.
    dst2 = tmp_path / "dst2"
    with pytest.raises(KeyboardInterrupt):
        pull(dst2, NAME, DirSource(src), digest=m.digest, rate=4 << 20, on_progress=die)
    corrupt(dst2 / ".pull-qemu_debian-12_amd64" / "disk.qcow2.part", at=100)
    with pytest.raises(TransferCorrupt):
        pull(dst2, NAME, DirSource(src), digest=m.digest)
    assert scan(dst2) == ([], [])


def test_the_rate_cap_paces_the_transfer(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src, disk_mib=4)
    t0 = time.monotonic()
    result = pull(dst, NAME, DirSource(src), digest=m.digest, rate=8 << 20)
    took = time.monotonic() - t0
    assert took >= result.fetched / (8 << 20) * 0.9, took
    assert result.rate <= (8 << 20) * 1.1


def test_bytes_a_local_image_has_are_not_fetched_again(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_image(dst, name="qemu:debian-12+gitlab:amd64")  # the same files, another name
    m = make_image(src)
    result = pull(dst, NAME, DirSource(src), digest=m.digest)
    assert result.fetched == 0 and result.reused == sum(f.size for f in m.files())


def test_another_build_of_the_name_is_replaced_only_when_asked(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_image(dst, seed=b"local build")
    m = make_image(src)
    with pytest.raises(BadInput, match="another qemu:debian-12:amd64 is here"):
        pull(dst, NAME, DirSource(src), digest=m.digest)
    pull(dst, NAME, DirSource(src), digest=m.digest, replace=True)
    assert [i.manifest.digest for i in scan(dst)[0]] == [m.digest]


def test_which_images_a_host_fetches_first() -> None:
    missing = [{"name": n, "digest": "d"} for n in (
        "qemu:debian-12:arm64", "qemu:debian-13:amd64", "qemu:debian-12:amd64",
    )]  # fmt: skip
    names = [w.name for w in order_wanted(missing, "all", machine="x86_64")]
    assert names == ["qemu:debian-12:amd64", "qemu:debian-13:amd64", "qemu:debian-12:arm64"]
    assert [w.name for w in order_wanted(missing, "debian-12", "x86_64")] == [
        "qemu:debian-12:amd64",
        "qemu:debian-12:arm64",
    ]
    assert order_wanted(missing, "none") == []


def test_the_pool_catalogue_prefers_the_build_most_hosts_have() -> None:
    def host(hid: str, state: str, *images: tuple[str, str]) -> dict[str, Any]:
        imgs = [{"name": n, "digest": d, "bytes": 10, "built_at": "t"} for n, d in images]
        return {"id": hid, "state": state, "images": imgs}

    hosts = [
        host("h1", "up", (NAME, "a"), ("qemu:debian-13:amd64", "c")),
        host("h2", "up", (NAME, "b")),
        host("h3", "up", (NAME, "b")),
        host("h4", "down", ("qemu:debian-12:arm64", "e")),
        host("h5", "up"),
    ]
    pool = pool_images(hosts)
    assert pool[NAME]["digest"] == "b" and pool[NAME]["hosts"] == ["h2", "h3"]
    assert "qemu:debian-12:arm64" not in pool  # only on a host that is down
    missing = {i["name"]: i for i in missing_images(hosts, "h5")}
    assert set(missing) == {NAME, "qemu:debian-13:amd64"}
    assert missing[NAME]["hosts"] == 2 and missing[NAME]["bytes"] == 10
    assert [i["name"] for i in missing_images(hosts, "h2")] == ["qemu:debian-13:amd64"]


# -- through a real scheduler and a real hostd API ---------------------------------------------
class Pool:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.h1_images = tmp / "h1-images"
        self.manifest = make_image(self.h1_images)
        mgr = SimpleNamespace(  # what the image routes use of the VM manager (and /v1/vms)
            cfg=SimpleNamespace(image_path=self.h1_images, host_id="h1"), all=lambda: []
        )
        self.hostd = make_server(
            hostd_app(cast(Any, mgr), H1_TOKEN), "127.0.0.1", 0, name="hostd-h1", threads=8
        )
        self.sched = Scheduler(tmp / "sched", {}, admin_token=ADMIN, join_token=JOIN)
        self.api = make_server(sched_app(self.sched), "127.0.0.1", 0, name="sched", threads=8)
        for server in (self.hostd, self.api):
            threading.Thread(target=server.run, daemon=True).start()
        self.url = self.api.url
        self._register("h1", self.hostd.url, H1_TOKEN, [self._image_report()])
        self._register("h2", "http://127.0.0.1:9", H2_TOKEN, [])

    def _image_report(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": m.name, "digest": m.digest, "bytes": sum(f.size for f in m.files()),
                "arch": m.arch, "built_at": m.built_at}  # fmt: skip

    def _register(self, hid: str, url: str, token: str, images: list[dict[str, Any]]) -> None:
        self.sched.pool.register(HostRegistration(hid, url, token, {"images": images}))

    def as_h2(self, token: str = H2_TOKEN) -> PoolSource:
        return PoolSource(self.url, "h2", token, True)

    def close(self) -> None:
        self.api.close()
        self.hostd.close()
        self.sched.stop()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path)
    yield p
    p.close()


def test_a_host_fetches_what_it_lacks_through_the_scheduler(pool: Pool, tmp_path: Path) -> None:
    h2 = pool.as_h2()
    (want,) = h2.missing()
    assert want == {
        "name": NAME, "digest": pool.manifest.digest, "arch": "amd64",
        "bytes": sum(f.size for f in pool.manifest.files()), "built_at": pool.manifest.built_at,
        "hosts": 1,
    }  # fmt: skip
    result = pull(tmp_path / "h2-images", NAME, h2, digest=want["digest"])
    assert [i.manifest.digest for i in scan(tmp_path / "h2-images")[0]] == [pool.manifest.digest]
    assert result.fetched == want["bytes"]
    # The serving host is named to the fetcher, never its address or token.
    r = requests.get(
        f"{pool.url}/v1/images/{NAME}/files/vmlinuz",
        headers={"Authorization": f"Bearer {H2_TOKEN}", "X-TT-Host": "h2"},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["X-TT-Source-Host"] == "h1"
    assert pool.hostd.url.split("//")[1] not in json.dumps(dict(r.headers))
    assert H1_TOKEN not in json.dumps(dict(r.headers))


def test_a_range_request_passes_through_the_scheduler(pool: Pool) -> None:
    headers = {"Authorization": f"Bearer {H2_TOKEN}", "X-TT-Host": "h2", "Range": "bytes=100-"}
    r = requests.get(f"{pool.url}/v1/images/{NAME}/files/initrd.img", headers=headers, timeout=10)
    assert r.status_code == 206, r.text
    assert r.headers["Content-Range"] == f"bytes 100-{200_000 - 1}/200000"
    data = (pool.h1_images / "qemu_debian-12_amd64" / "initrd.img").read_bytes()
    assert r.content == data[100:]


def test_a_pull_killed_mid_file_resumes_through_the_scheduler(pool: Pool, tmp_path: Path) -> None:
    dst = tmp_path / "h2-images"

    def die(p: Any) -> None:
        if p.file == "disk.qcow2" and p.done > (1 << 20):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull(dst, NAME, pool.as_h2(), rate=4 << 20, on_progress=die)
    staged = (dst / ".pull-qemu_debian-12_amd64" / "disk.qcow2.part").stat().st_size
    result = pull(dst, NAME, pool.as_h2())
    assert result.resumed >= staged > 0
    assert result.fetched == pool.manifest.disk.size - staged
    assert [i.manifest.digest for i in scan(dst)[0]] == [pool.manifest.digest]


def test_a_corrupted_copy_on_the_serving_host_is_refused(pool: Pool, tmp_path: Path) -> None:
    corrupt(pool.h1_images / "qemu_debian-12_amd64" / "disk.qcow2")
    with pytest.raises(TransferCorrupt, match="not what the manifest says"):
        pull(tmp_path / "h2-images", NAME, pool.as_h2(), digest=pool.manifest.digest)
    assert scan(tmp_path / "h2-images") == ([], [])


def test_only_hosts_bearing_their_own_token_and_admins_fetch(pool: Pool, tmp_path: Path) -> None:
    url = f"{pool.url}/v1/images/{NAME}/manifest"

    def get(headers: dict[str, str], path: str = url) -> requests.Response:
        return requests.get(path, headers=headers, timeout=10)

    assert get({}).status_code == 401
    assert get({"Authorization": f"Bearer {H1_TOKEN}", "X-TT-Host": "h2"}).status_code == 403
    assert get({"Authorization": f"Bearer {JOIN}", "X-TT-Host": "h2"}).status_code == 403
    assert get({"Authorization": f"Bearer {H2_TOKEN}", "X-TT-Host": "h9"}).status_code == 403
    user = pool.sched.users.add("alice")
    r = get({"Authorization": f"Bearer {user['token']}"})
    assert r.status_code == 403 and "may not fetch images" in r.json()["error"]
    assert get({"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    # A host asks for its own list only.
    other = f"{pool.url}/v1/hosts/h1/images/missing"
    assert get({"Authorization": f"Bearer {H2_TOKEN}", "X-TT-Host": "h2"}, other).status_code == 403
    # An admin pulls like a host (tt image pull).
    admin = HttpSource(pool.url, {"Authorization": f"Bearer {ADMIN}"})
    pull(tmp_path / "admin-images", NAME, admin, digest=pool.manifest.digest)
    # Nothing has it with another digest; a file the manifest does not list is no file.
    with pytest.raises(TransferError, match="404"):
        pull(tmp_path / "x", NAME, pool.as_h2(), digest="f" * 64)
    r = get({"Authorization": f"Bearer {ADMIN}"}, f"{pool.url}/v1/images/{NAME}/files/secret")
    assert r.status_code == 404


def test_hostd_serves_only_the_files_an_image_lists(pool: Pool) -> None:
    h = {"Authorization": f"Bearer {H1_TOKEN}"}
    base = f"{pool.hostd.url}/v1/images"
    assert (
        requests.get(f"{base}/{NAME}/files/manifest.json", headers=h, timeout=5).status_code == 404
    )
    assert requests.get(f"{base}/{NAME}/files/disk.qcow2", timeout=5).status_code == 401
    r = requests.get(f"{base}/{NAME}/manifest", params={"digest": "0" * 64}, headers=h, timeout=5)
    assert r.status_code == 409 and "another build" in r.json()["error"]
    assert (
        requests.get(f"{base}/qemu:debian-13:amd64/manifest", headers=h, timeout=5).status_code
        == 404
    )
    # Not joined: it fetches nothing by itself and says so.
    r = requests.post(f"{base}/fetch", json={"name": NAME}, headers=h, timeout=5)
    assert r.status_code == 409 and "did not --join" in r.json()["error"]


def test_free_space_is_checked_before_a_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostd.images import transfer

    src = tmp_path / "src"
    m = make_image(src)
    monkeypatch.setattr(transfer, "free_bytes", lambda p: 512 << 20)
    with pytest.raises(BadInput, match=r"needs .* MiB more"):
        pull(tmp_path / "dst", NAME, DirSource(src), digest=m.digest)
