"""Warm start as the pool shows it: hosts report their templates and restore self-tests (the real
hostd.vm.templates report, from hostd's real state database), and the real scheduler (SQLite,
on loopback) shows per image whether its VMs start warm and why not in `tt image list` (the real
CLI), its JSON, the admin page's state and /metrics. A hostile `warm` field makes only that host
unhealthy: listings, the catalogue and the metrics still serve everyone else."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from hostd.vm.schema import open_store
from hostd.vm.templates import Templates
from tests.cloudutil import configure_client, tt
from ttci.infra.db import now
from ttci.scheduler.admin.state import snapshot
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app
from ttci.wire.api import API_VERSION

ADMIN = "admin-" + secrets.token_urlsafe(16)
JOIN = "join-" + secrets.token_urlsafe(16)
TOKENS = {h: f"{h}-" + secrets.token_urlsafe(16) for h in ("h1", "h2", "h3")}
AMD64, ARM64, PPC = (f"qemu:debian-12:{a}" for a in ("amd64", "arm64", "ppc64el"))
QEMU = 7_002_000


def _image(name: str, profile: str = "agent") -> dict[str, Any]:
    return {"name": name, "arch": name.rsplit(":", 1)[1], "profile": profile, "disk_gib": 4}


def _warm_report(state: Path, *, enabled: bool = True, ready: bool = True) -> dict[str, Any]:
    """What a hostd reports: a ready (or building) 1x512 template of amd64, a failed ppc64el
    restore self-test, a passed amd64 one, some hits and misses (hostd's own state and code)."""
    store = open_store(state)
    tpl = {"key": "k", "image_digest": "d", "dir": "/nowhere", "domain": "dom", "token": "secret"}
    tpl |= {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "accel": "tcg", "qemu": QEMU}
    with store.lock:
        store.db.table("templates").insert(
            {
                **tpl,
                "id": "t1",
                "image": AMD64,
                "arch": "amd64",
                "state": "ready" if ready else "building",
                "bytes": 105 << 20,
                "boot_s": 3.1,
                "error": "",
                "hits": 7,
                "created_at": now(),
            }
        )
        for arch, ok, detail in (("amd64", 1, "3/3 restores woke"), ("ppc64el", 0, "0/1 woke")):
            store.db.table("restore_tests").insert(
                {
                    "target": f"{arch}/qemu-{QEMU}/tcg",
                    "arch": arch,
                    "qemu": QEMU,
                    "accel": "tcg",
                    "ok": ok,
                    "passed": 3 * ok,
                    "tries": 3,
                    "detail": detail,
                    "restore_s": 0.4,
                    "tested_at": now(),
                }
            )
    templates = Templates(store, state / "templates", "h", None, enabled=enabled)
    templates.hits = 7
    templates.misses.update({"selftest_failed": 2, "asked": 1})
    report = templates.report()
    store.db.close()
    return report


def _info(warm: Any, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "machine": "x86_64",
        "accel": "tcg",
        "total": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
        "used": {"cpus": 0, "memory_mib": 0, "disk_gib": 0},
        "free": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
        "vms": 0,
        "images": images,
        **({"warm": warm} if warm is not None else {}),
    }


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[Scheduler]:
    s = Scheduler(tmp_path / "sched", {}, admin_token=ADMIN, join_token=JOIN, host_timeout=3600)
    yield s
    s.stop()


@pytest.fixture
def reports(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """h1: warm for amd64, its ppc64el self-test failed; h2: warm start off; h3: an older hostd."""
    (tmp_path / "h1").mkdir()
    (tmp_path / "h2").mkdir()
    systemd = {**_image("qemu:debian-12:i386"), "profile": "systemd"}
    return {
        "h1": _info(
            _warm_report(tmp_path / "h1"), [_image(AMD64), _image(ARM64), _image(PPC), systemd]
        ),
        "h2": _info(_warm_report(tmp_path / "h2", enabled=False), [_image(AMD64)]),
        "h3": _info(None, [_image(ARM64)]),
    }


@pytest.fixture
def api(sched: Scheduler, reports: dict[str, dict[str, Any]]) -> FlaskClient:
    c = create_app(sched).test_client()
    for n, (hid, info) in enumerate(reports.items()):
        body = {"api": API_VERSION, "id": hid, "url": f"http://127.0.0.1:{7431 + n}"}
        body |= {"token": TOKENS[hid], "info": info}
        r = c.post("/v1/hosts/register", json=body, headers=_auth(JOIN))
        assert r.status_code == 200 and "report_error" not in r.json, r.text
    return c


def _images(api: FlaskClient, token: str = ADMIN) -> dict[str, dict[str, Any]]:
    r = api.get("/v1/images", headers=_auth(token))
    assert r.status_code == 200, r.text
    return {i["name"]: i for i in r.json}


def test_images_say_warm_or_cold_and_why(api: FlaskClient, sched: Scheduler) -> None:
    alice = sched.users.add("alice")["token"]
    images = _images(api, alice)
    amd64 = images[AMD64]["warm"]
    assert amd64["start"] == "warm" and amd64["warm_hosts"] == ["h1"]
    assert "off on the host" in amd64["cold"]["h2"]
    ppc = images[PPC]["warm"]
    assert (
        ppc["start"] == "cold" and "restore self-test failed on QEMU 7.2.0: 0/1 woke" in ppc["why"]
    )
    arm64 = images[ARM64]["warm"]  # h1 has no template yet; h3 is an older hostd
    assert arm64["start"] == "cold"
    assert "h1: no template yet" in arm64["why"] and "h3: the host does not report" in arm64["why"]
    assert images["qemu:debian-12:i386"]["warm"]["why"] == "profile systemd boots cold"
    # The host report keeps the templates (no token, no paths: hostd never sends them).
    h1 = next(h for h in api.get("/v1/hosts", headers=_auth(ADMIN)).json if h["id"] == "h1")
    assert [t["image"] for t in h1["warm"]["templates"]] == [AMD64]
    assert "secret" not in json.dumps(h1) and "/nowhere" not in json.dumps(h1)


def test_admin_page_and_metrics_show_templates_and_misses(
    api: FlaskClient, sched: Scheduler
) -> None:
    page = snapshot(sched.store, sched.hosts(), sched.images())
    starts = {i["name"]: i["warm"]["start"] for i in page["images"]}
    assert starts[AMD64] == "warm" and starts[PPC] == "cold"
    hosts = {h["id"]: h for h in page["hosts"]}
    assert hosts["h1"]["templates"] == 1 and hosts["h2"]["templates"] == 1
    assert "warm" not in hosts["h1"]  # the page's host rows stay small
    text = api.get("/metrics").text
    assert 'ttci_host_templates{arch="amd64",host="h1"} 1.0' in text
    assert (
        'ttci_host_restore_selftest{accel="tcg",arch="ppc64el",host="h1",qemu="7.2.0"} 0.0' in text
    )
    assert 'ttci_host_vm_starts_total{host="h1",kind="warm"} 7.0' in text
    assert 'ttci_warm_misses_total{reason="selftest_failed"} 4.0' in text  # h1 + h2
    assert 'ttci_warm_misses_total{reason="asked"} 2.0' in text
    assert "secret" not in text


@pytest.fixture
def live(api: FlaskClient, sched: Scheduler, tmp_path: Path) -> Iterator[Path]:
    """The scheduler on loopback and a client config for the admin."""
    server = make_server("127.0.0.1", 0, create_app(sched), threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    cfg = tmp_path / "client.json"
    configure_client(f"http://127.0.0.1:{server.server_port}", ADMIN, cfg)
    yield cfg
    server.shutdown()
    t.join()


def test_tt_image_list_has_a_start_column(live: Path) -> None:
    r = tt("image", "list", config=live, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if "qemu:" in line}
    assert "warm (cold on h2)" in rows[AMD64]
    assert "cold: restore self-test failed" in rows[PPC]
    r = tt("image", "list", "--json", config=live, timeout=60)
    assert r.returncode == 0, r.stderr
    by_name = {i["name"]: i for i in json.loads(r.stdout)}
    assert by_name[AMD64]["warm"]["start"] == "warm" and by_name[PPC]["warm"]["start"] == "cold"


BAD_WARM = {
    "not an object": [],
    "enabled a string": {"enabled": "yes"},
    "templates not a list": {"templates": {"image": AMD64}},
    "10,000 templates": {"templates": [{"image": AMD64, "state": "ready"}] * 10_000},
    "template image a path": {"templates": [{"image": "../../etc/passwd", "state": "ready"}]},
    "template error 100 kB": {"templates": [{"image": AMD64, "error": "x" * 100_000}]},
    "template hits negative": {"templates": [{"image": AMD64, "hits": -1}]},
    "template bytes a float": {"templates": [{"image": AMD64, "bytes": 1.5}]},
    "selftest ok a string": {"selftests": [{"arch": "amd64", "ok": "true"}]},
    "selftest restore NaN": {"selftests": [{"arch": "amd64", "ok": True, "restore_s": 1e309}]},
    "misses not an object": {"misses": [1, 2]},
    "miss reason markup": {"misses": {"<script>": 1}},
    "miss count huge": {"misses": {"off": 10**30}},
    "100 miss reasons": {"misses": {f"r{'_' * n}": 1 for n in range(1, 100)}},
}


@pytest.mark.parametrize("what", sorted(BAD_WARM))
def test_a_hostile_warm_report_makes_only_that_host_unhealthy(
    api: FlaskClient, sched: Scheduler, what: str
) -> None:
    bad = _info(BAD_WARM[what], [_image(AMD64)])
    beat = {"api": API_VERSION, "id": "h2", "info": bad}
    r = api.post("/v1/hosts/heartbeat", json=beat, headers=_auth(TOKENS["h2"]))
    if r.status_code == 400:  # JSON no parser takes (1e309): refused whole, nothing stored
        assert "number" in r.json["error"], r.text
    else:
        assert (
            r.status_code == 200
            and "malformed" in r.json["report_error"]
            and "warm" in (r.json["report_error"])
        ), r.text
        hosts = {h["id"]: h for h in api.get("/v1/hosts", headers=_auth(ADMIN)).json}
        assert hosts["h2"]["state"] == "unhealthy"
        assert hosts["h2"]["warm"]["enabled"] is False  # its last good report, not this one
    alice = sched.users.add("alice")["token"]
    images = _images(api, alice)
    assert images[AMD64]["warm"]["start"] == "warm" and images[AMD64]["warm"]["warm_hosts"] == [
        "h1"
    ]
    assert api.get("/metrics").status_code == 200
    page = snapshot(sched.store, sched.hosts(), sched.images())
    assert {i["name"] for i in page["images"]} >= {AMD64, PPC}
