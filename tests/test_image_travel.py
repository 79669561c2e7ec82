"""Images travel: a host that lacks an image fetches it from a host that has it, through the
scheduler, verified before it is offered, resumable, paced.

Fast tests: pulls from a directory and through a real scheduler and a real hostd API (waitress on
loopback, small fake images): verification, a corrupted source refused and never offered, a
pull cut mid-file resumed with a Range request, the rate cap, local reuse by sha256, the trust
rules (a host bears its own token; no user but an admin), the pool's missing list. The vm/e2e
tests do it with real daemons: a second host in a network namespace joins an all-in-one cloud,
fetches its image and runs a job in a real VM; a damaged image is refused and never offered; an
operator's pull resumes after its cable was pulled.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests
from werkzeug.serving import make_server

from hostd.images.catalogue import find, scan
from hostd.images.fetcher import PoolSource, order_wanted
from hostd.images.sources import DirSource, HttpSource, TransferCorrupt, TransferError
from hostd.images.transfer import pull, remove_partial
from hostd.service.api import create_app as hostd_app
from tests.cloudutil import BIN, configure_client, free_port, qemu_pids, tt
from tests.conftest import built_image
from tests.netlab import Lab, lab
from ttci.cli.allinone import STOP_GRACE_S, Stack, _spawn, python_main, running
from ttci.infra.proc import BASE_ENV, stop
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
    assert result.reconnects == ((2 << 20) + 12345,) and result.resumed == 0
    assert result.fetched == sum(f.size for f in m.files())  # no byte fetched twice
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


def test_a_build_that_lands_during_a_pull_is_not_replaced_unasked(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    m = make_image(src)

    def build_meanwhile(p: Any) -> None:
        if p.file == "disk.qcow2" and not (dst / "qemu_debian-12_amd64").exists():
            make_image(dst, seed=b"built here meanwhile")

    with pytest.raises(BadInput, match=r"appeared .* while it was fetched"):
        pull(dst, NAME, DirSource(src), digest=m.digest, rate=8 << 20, on_progress=build_meanwhile)
    assert [i.manifest.digest for i in scan(dst)[0]] != [m.digest]
    # Asked to, the verified staging takes its place without fetching again.
    result = pull(dst, NAME, DirSource(src), digest=m.digest, replace=True)
    assert result.fetched == 0 and result.resumed == sum(f.size for f in m.files())
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
        # werkzeug's threaded server (it stops cleanly from the test's thread); the real
        # daemons' waitress serves the vm/e2e tests below.
        self.hostd = make_server("127.0.0.1", 0, hostd_app(cast(Any, mgr), H1_TOKEN), threaded=True)
        self.sched = Scheduler(tmp / "sched", {}, admin_token=ADMIN, join_token=JOIN)
        self.api = make_server("127.0.0.1", 0, sched_app(self.sched), threaded=True)
        self.threads = [
            threading.Thread(target=server.serve_forever, daemon=True)
            for server in (self.hostd, self.api)
        ]
        for t in self.threads:
            t.start()
        self.url = f"http://127.0.0.1:{self.api.server_port}"
        self.hostd_url = f"http://127.0.0.1:{self.hostd.server_port}"
        self._register("h1", self.hostd_url, H1_TOKEN, [self._image_report()])
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
        for server in (self.api, self.hostd):
            server.shutdown()
            server.server_close()
        for t in self.threads:
            t.join(10)
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
    assert pool.hostd_url.split("//")[1] not in json.dumps(dict(r.headers))
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
    base = f"{pool.hostd_url}/v1/images"
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


# -- for real: a second host joins an all-in-one cloud -----------------------------------------
# `tt up`'s stack (scheduler + hostd "local" on loopback, with the image) with the scheduler on a
# lab bridge and a join token; a second hostd in a network namespace joins with an empty image
# path, fetches the image through the scheduler and runs a job in a real VM. No namespace has a
# default route: nothing leaves for an address this test did not make.
TRAVEL_JOIN = "join-" + secrets.token_urlsafe(16)
H2 = "h2"
H2_PORT = 7420


@dataclass
class Travel:
    lab: Lab
    state: Path
    stack: Stack
    cfg: Path
    local_images: Path
    h2_images: Path
    h2_token: str
    h2: subprocess.Popen[bytes] | None = None
    h2_started: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def h2_addr(self) -> str:
        return self.lab.addr(11)

    def tt(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return tt(*args, config=self.cfg, timeout=timeout)

    def start_h2(self) -> None:
        argv = [
            "nsenter", f"--net=/run/netns/{self.lab.namespaces[0]}",
            *python_main("hostd.cli.main"), "serve",
            "--listen", f"{self.h2_addr}:{H2_PORT}", "--state-dir", str(self.state / H2),
            "--image-path", str(self.h2_images), "--host-id", H2, "--private-libvirtd",
            "--cpu-total", "2", "--mem-total", "2048", "--outgoing", "deny", "--dns", "none",
            "--join", self.stack.scheduler,
        ]  # fmt: skip
        env = {**BASE_ENV, "TT_HOSTD_TOKEN": self.h2_token, "TT_JOIN_TOKEN": TRAVEL_JOIN}
        self.h2_started = time.monotonic()
        self.h2 = _spawn(argv, env, self.state / "h2.log", "tt-hostd h2")

    def h2_api(self, path: str) -> Any:
        r = requests.get(
            f"http://{self.h2_addr}:{H2_PORT}{path}",
            headers={"Authorization": f"Bearer {self.h2_token}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    def pool_images(self) -> dict[str, list[str]]:
        r = self.tt("image", "list", "--json")
        assert r.returncode == 0, r.stderr
        return {i["name"]: i["hosts"] for i in json.loads(r.stdout)}


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _link_image(src: Path, dst_root: Path) -> None:
    """The test image beside the original by hard links (nobody writes image files)."""
    dst = dst_root / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name)


@pytest.fixture(scope="module")
def travel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Travel]:
    image = built_image("debian-12", "amd64")  # NAME, built once per machine (cached after)
    state = tmp_path_factory.mktemp("travel")
    local_images, h2_images = state / "local-images", state / "h2-images"
    _link_image(image.path, local_images)
    old_join = os.environ.get("TT_JOIN_TOKEN")
    os.environ["TT_JOIN_TOKEN"] = TRAVEL_JOIN  # running() hands TT_* to the scheduler
    with lab() as the_lab:
        bridge = the_lab.up()
        the_lab.node(H2, 11)
        try:
            with running(
                state,
                local_images,
                scheduler_listen=f"{bridge}:{free_port()}",
                hostd_listen=f"127.0.0.1:{free_port()}",
                cpu_total=2,
                mem_total=2048,
            ) as stack:
                cfg = state / "client.json"
                configure_client(stack.scheduler, stack.token, cfg)
                t = Travel(the_lab, state, stack, cfg, local_images, h2_images,
                           secrets.token_urlsafe(24))  # fmt: skip
                try:
                    yield t
                finally:
                    if t.h2 is not None:
                        stop(t.h2, grace=STOP_GRACE_S)
                        assert qemu_pids(str(state / H2)) == [], "QEMU left on h2"
                    print("\nimage travel measurements:", json.dumps(t.measured, indent=2))
        finally:
            if old_join is None:
                os.environ.pop("TT_JOIN_TOKEN", None)
            else:
                os.environ["TT_JOIN_TOKEN"] = old_join


@pytest.mark.vm
@pytest.mark.e2e
def test_a_second_host_joins_fetches_and_runs_a_job(travel: Travel) -> None:
    """Done when: a second host joins an all-in-one cloud, fetches its image from the first
    without building, verifies it, and runs a job; the time from join to first output."""
    assert travel.tt("host", "drain", "local").returncode == 0  # the job must go to h2
    travel.start_h2()
    ready = time.monotonic()
    first = None
    lines = []
    with subprocess.Popen(
        [str(BIN / "tt"), "job", "run", "--os", "debian-12", "--arch", "amd64", "--mem", "512",
         "--no-copy", "--", "sh", "-c", "echo first-output-from $(uname -m)"],
        env={**os.environ, "TT_CONFIG": str(travel.cfg)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as job:  # fmt: skip
        assert job.stdout is not None and job.stderr is not None
        for line in job.stdout:
            lines.append(line)
            if "first-output-from" in line and first is None:
                first = time.monotonic()
        err = job.stderr.read()
        rc = job.wait(timeout=600)
    assert rc == 0 and first is not None, ("".join(lines), err)
    assert "first-output-from x86_64" in "".join(lines)

    fetches = travel.h2_api("/v1/images/fetches")
    (done,) = [f for f in fetches["recent"] if f["name"] == NAME]
    local = find(travel.local_images, NAME)
    assert done["ok"] and done["digest"] == local.manifest.digest, done
    assert done["fetched"] == sum(f.size for f in local.manifest.files())  # nothing built
    here = find(travel.h2_images, NAME)
    assert (here.path / MANIFEST_FILE).read_bytes() == (local.path / MANIFEST_FILE).read_bytes()
    assert set(travel.pool_images()[NAME]) == {"h2", "local"}
    travel.measured.update(
        join_to_ready_s=round(ready - travel.h2_started, 1),
        join_to_first_output_s=round(first - travel.h2_started, 1),
        image=NAME,
        image_mib=done["bytes"] >> 20,
        transfer_s=done["seconds"],
        transfer_mib_s=done["rate_mib_s"],
    )
    assert first - travel.h2_started < 300, travel.measured  # the goal: 5 minutes
    assert travel.tt("host", "undrain", "local").returncode == 0


@pytest.mark.vm
@pytest.mark.e2e
def test_a_corrupted_image_is_refused_and_never_offered(travel: Travel) -> None:
    bad = "qemu:debian-12+corrupt:amd64"
    if travel.h2 is None:
        travel.start_h2()
    src = find(travel.local_images, NAME).path
    dst = travel.local_images / ImageName.parse(bad).dirname
    dst.mkdir()
    for f in src.iterdir():
        if f.name != MANIFEST_FILE:
            shutil.copyfile(f, dst / f.name)
    # Bytes h2 has nowhere (else it would take them from its own copy of the good image): a
    # longer disk, its size and sha256 in the manifest, then one byte flipped in the middle.
    with (dst / "disk.qcow2").open("ab") as f:
        f.write(b"\0" * 4096)
    disk = dst / "disk.qcow2"
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    manifest["disk"] = {"path": "disk.qcow2", "size": disk.stat().st_size, "sha256": sha}
    (dst / MANIFEST_FILE).write_text(json.dumps({**manifest, "name": bad}))
    corrupt(disk, at=100 << 20)  # same size: "local" offers it
    _wait(lambda: bad in travel.pool_images(), 30, "local to report the damaged image")
    r = travel.tt("image", "push", bad, "--host", H2)
    assert r.returncode == 0 and "h2: fetching" in r.stdout, r.stdout + r.stderr

    def refused() -> bool:
        recent = travel.h2_api("/v1/images/fetches")["recent"]
        return any(f["name"] == bad and not f["ok"] for f in recent)

    _wait(refused, 120, "h2 to refuse the damaged image")
    (entry, *_) = [f for f in travel.h2_api("/v1/images/fetches")["recent"] if f["name"] == bad]
    assert "disk.qcow2" in entry["error"] and "not what the manifest says" in entry["error"]
    time.sleep(6)  # a heartbeat or two later, still not offered
    assert travel.pool_images()[bad] == ["local"]
    assert bad not in {i["name"] for i in travel.h2_api("/v1/host")["images"]}
    assert not (travel.h2_images / ImageName.parse(bad).dirname).exists()
    staged = travel.h2_images / f".pull-{ImageName.parse(bad).dirname}"
    assert not (staged / "disk.qcow2").exists() and not (staged / "disk.qcow2.part").exists()
    shutil.rmtree(dst)


@pytest.mark.vm
@pytest.mark.e2e
def test_a_pull_resumes_after_the_cable_was_pulled(travel: Travel) -> None:
    """`tt image pull` on h2 (an operator's), paced, its cable pulled mid-transfer for longer
    than the read timeout: it retries, and resumes with a Range request when the cable is back."""
    if travel.h2 is None:
        travel.start_h2()
    dest = travel.state / "cli-images"
    pull_cmd = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{travel.lab.namespaces[0]}", str(BIN / "tt"), "image",
         "pull", NAME, "--rate", "30", "--image-path", str(dest), "--json"],
        env={**os.environ, "TT_CONFIG": str(travel.cfg)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    part = dest / ".pull-qemu_debian-12_amd64" / "disk.qcow2.part"
    _wait(lambda: part.exists() and part.stat().st_size > (40 << 20), 60, "the pull to start")
    travel.lab.cut(H2)
    try:
        time.sleep(35)  # past the 30 s read timeout: the connection is given up
        at_cut = part.stat().st_size
    finally:
        travel.lab.cut(H2, down=False)
    out, err = pull_cmd.communicate(timeout=300)
    assert pull_cmd.returncode == 0, err
    result = json.loads(out)
    total = sum(f.size for f in find(travel.local_images, NAME).manifest.files())
    # It reconnected where the cut left it, and no byte came twice.
    assert any(r >= at_cut > (40 << 20) for r in result["reconnects"]), result
    assert result["fetched"] == total and result["resumed"] == 0, result
    assert find(dest, NAME).manifest.digest == find(travel.local_images, NAME).manifest.digest
    travel.measured.update(cut_resumed_at_mib=at_cut >> 20, cut_pull_s=result["seconds"])
