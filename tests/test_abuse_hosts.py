"""Host impersonation and hostile host reports, against a real scheduler state (SQLite) through
Flask's test client (and, for the joiner, a real scheduler on loopback): a join-token holder
can neither take over a registered host's id nor heartbeat for it; a malformed report makes only
that host unhealthy, never the listing, the catalogue or placement of anyone else."""

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

from hostd.service.joiner import Joiner, JoinRefused
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app
from ttci.wire.api import API_VERSION

ADMIN = "admin-" + secrets.token_urlsafe(16)
JOIN = "join-" + secrets.token_urlsafe(16)
T1 = "host1-" + secrets.token_urlsafe(16)
T2 = "host2-" + secrets.token_urlsafe(16)
IMAGE = "qemu:debian-12:amd64"
GOOD = {
    "machine": "x86_64",
    "accel": "tcg",
    "total": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
    "used": {"cpus": 0, "memory_mib": 0, "disk_gib": 0},
    "free": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
    "vms": 0,
    "images": [{"name": IMAGE, "arch": "amd64", "disk_gib": 4}],
}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _reg(hid: str, token: str, port: int, info: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "api": API_VERSION,
        "id": hid,
        "url": f"http://127.0.0.1:{port}",
        "token": token,
        "info": GOOD if info is None else info,
        **extra,
    }


def _beat(hid: str, info: Any = None) -> dict[str, Any]:
    return {"api": API_VERSION, "id": hid, "info": GOOD if info is None else info}


@pytest.fixture
def sched(tmp_path: Path, database: str) -> Iterator[Scheduler]:
    s = Scheduler(
        tmp_path, {}, admin_token=ADMIN, join_token=JOIN, host_timeout=3600, database=database
    )
    yield s
    s.close()


@pytest.fixture
def api(sched: Scheduler) -> FlaskClient:
    c = create_app(sched).test_client()
    for hid, token, port in (("h1", T1, 7421), ("h2", T2, 7422)):
        r = c.post("/v1/hosts/register", json=_reg(hid, token, port), headers=_auth(JOIN))
        assert r.status_code == 200, r.text
        assert "report_error" not in r.json
    return c


def _hosts(c: FlaskClient, token: str = ADMIN) -> dict[str, dict[str, Any]]:
    r = c.get("/v1/hosts", headers=_auth(token))
    assert r.status_code == 200, r.text
    return {h["id"]: h for h in r.json}


# -- identity --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        {"url": "http://10.6.6.6:7421", "token": "impostor-" + "x" * 20},  # both new
        {"token": "impostor-" + "x" * 20},  # same URL, new token
        {"token": "impostor-" + "x" * 20, "current_token": T2},  # another host's token
        {"token": "impostor-" + "x" * 20, "current_token": JOIN},  # the join token
    ],
)
def test_an_existing_id_is_not_taken_with_the_join_token(
    api: FlaskClient, change: dict[str, str]
) -> None:
    body = {**_reg("h1", T1, 7421), **change}
    r = api.post("/v1/hosts/register", json=body, headers=_auth(JOIN))
    assert r.status_code == 409, r.text
    assert "registered by another host" in r.json["error"]
    assert "tt host forget h1" in r.json["hint"]
    h1 = _hosts(api)["h1"]
    assert h1["url"] == "http://127.0.0.1:7421" and h1["state"] == "up"
    assert api.application.config["SCHEDULER"].pool.client("h1").token == T1


def test_the_host_itself_may_move_or_change_its_token(api: FlaskClient) -> None:
    # Its own token: a new address is fine (a restarted hostd elsewhere).
    moved = _reg("h1", T1, 7431)
    assert api.post("/v1/hosts/register", json=moved, headers=_auth(JOIN)).status_code == 200
    assert _hosts(api)["h1"]["url"] == "http://127.0.0.1:7431"
    # A new token with the old one as proof.
    new = "host1-new-" + secrets.token_urlsafe(16)
    body = _reg("h1", new, 7431, current_token=T1)
    assert api.post("/v1/hosts/register", json=body, headers=_auth(JOIN)).status_code == 200
    assert api.post("/v1/hosts/heartbeat", json=_beat("h1"), headers=_auth(T1)).status_code == 403
    assert api.post("/v1/hosts/heartbeat", json=_beat("h1"), headers=_auth(new)).status_code == 200


def test_an_admin_forgets_a_host_and_its_id_is_free_again(api: FlaskClient) -> None:
    other = "host1-other-" + secrets.token_urlsafe(16)
    body = _reg("h1", other, 7441)
    assert api.post("/v1/hosts/register", json=body, headers=_auth(JOIN)).status_code == 409
    assert api.delete("/v1/hosts/h1", headers=_auth(JOIN)).status_code == 401  # no user
    assert api.delete("/v1/hosts/h1", headers=_auth(ADMIN)).status_code == 200
    assert api.post("/v1/hosts/register", json=body, headers=_auth(JOIN)).status_code == 200
    assert _hosts(api)["h1"]["url"] == "http://127.0.0.1:7441"


@pytest.mark.parametrize("bearer", [JOIN, T2, ADMIN, "", "x" * 40])
def test_a_heartbeat_for_another_host_is_refused(api: FlaskClient, bearer: str) -> None:
    empty = _beat("h1", {**GOOD, "images": []})  # e.g. emptying h1's image list
    r = api.post("/v1/hosts/heartbeat", json=empty, headers=_auth(bearer) if bearer else {})
    assert r.status_code == 403, r.text
    assert "does not bear host h1's token" in r.json["error"]
    assert [i["name"] for i in _hosts(api)["h1"]["images"]] == [IMAGE]
    r = api.post("/v1/hosts/heartbeat", json=_beat("h1"), headers=_auth(T1))
    assert r.status_code == 200 and r.json["id"] == "h1"


def test_heartbeats_for_unknown_or_bad_ids(api: FlaskClient) -> None:
    r = api.post("/v1/hosts/heartbeat", json=_beat("nobody"), headers=_auth(T1))
    assert r.status_code == 404  # the joiner registers again
    r = api.post("/v1/hosts/heartbeat", json=_beat("h1\n"), headers=_auth(T1))
    assert r.status_code == 400
    r = api.post("/v1/hosts/register", json=_reg("h3\n", T1, 7423), headers=_auth(JOIN))
    assert r.status_code == 400
    r = api.post("/v1/hosts/register", json=_reg("h3", T1, 99999), headers=_auth(JOIN))
    assert r.status_code == 400


# -- hostile reports -------------------------------------------------------------------------
BAD_REPORTS = {
    "images not a list": {**GOOD, "images": "qemu:debian-12:amd64"},
    "image not an object": {**GOOD, "images": ["qemu:debian-12:amd64"]},
    "image without a name": {**GOOD, "images": [{"arch": "amd64"}]},
    "image name not one": {**GOOD, "images": [{"name": "../../etc"}]},
    "image disk a string": {**GOOD, "images": [{"name": IMAGE, "disk_gib": "4"}]},
    "total with strings": {**GOOD, "total": {"cpus": "8", "memory_mib": "lots"}},
    "total not an object": {**GOOD, "total": [8, 16384, 100]},
    "free NaN": {**GOOD, "free": {"cpus": float("nan")}},
    "free infinite": {**GOOD, "free": {"cpus": float("inf")}},
    "negative memory": {**GOOD, "total": {"memory_mib": -1}},
    "huge integer": {**GOOD, "total": {"memory_mib": 10**400}},
    "boolean vms": {**GOOD, "vms": True},
    "10,000 images": {**GOOD, "images": [{"name": IMAGE}] * 10_000},
    "key state": {**GOOD, "state": "up"},
    "key url": {**GOOD, "url": "http://10.6.6.6:1"},
    "key id": {**GOOD, "id": "h1"},
    "key drained": {**GOOD, "drained": False},
    "long machine": {**GOOD, "machine": "x" * 100_000},
}


def _still_fine_for_others(api: FlaskClient, alice: str) -> None:
    """h1 serves everyone as before: listing, catalogue, placement (h2 is healthy or not)."""
    for token in (ADMIN, alice):
        hosts = _hosts(api, token)
        assert hosts["h1"]["state"] == "up"
        r = api.get("/v1/images", headers=_auth(token))
        assert r.status_code == 200, r.text
        assert IMAGE in {i["name"] for i in r.json}
        assert "h1" in r.json[0]["hosts"]
        body = {"name": "probe", "os_prefix": "debian-12:amd64", "dup_each": 3}
        r = api.post("/v1/envs?dry_run=1", json=body, headers=_auth(token))
        assert r.status_code == 200, r.text
        assert sum(r.json["hosts"].values()) == 3 and "h1" in r.json["hosts"]
        if hosts["h2"]["state"] != "up":
            assert r.json["hosts"] == {"h1": 3}
    r = api.get("/v1/status", headers=_auth(alice))
    assert r.status_code == 200 and r.json["hosts_up"] >= 1


@pytest.mark.parametrize("how", ["heartbeat", "register"])
@pytest.mark.parametrize("what", sorted(BAD_REPORTS))
def test_a_malformed_report_makes_only_that_host_unhealthy(
    api: FlaskClient, sched: Scheduler, what: str, how: str
) -> None:
    alice = sched.users.add("alice")["token"]
    bad = BAD_REPORTS[what]
    if how == "heartbeat":
        r = api.post("/v1/hosts/heartbeat", json=_beat("h2", bad), headers=_auth(T2))
    else:
        r = api.post("/v1/hosts/register", json=_reg("h2", T2, 7422, bad), headers=_auth(JOIN))
    if r.status_code == 400:  # JSON no parser takes (NaN, 400-digit numbers): refused whole
        assert "number" in r.json["error"], r.text
        assert _hosts(api)["h2"]["state"] == "up"
        _still_fine_for_others(api, alice)
        return
    assert r.status_code == 200, r.text
    assert "malformed" in r.json["report_error"]
    h2 = _hosts(api)["h2"]
    assert h2["state"] == "unhealthy" and "malformed" in h2["error"], h2
    # The report's keys never override what the scheduler owns.
    assert h2["id"] == "h2" and h2["url"] == "http://127.0.0.1:7422" and h2["drained"] is False
    _still_fine_for_others(api, alice)
    # A good report later makes it healthy again.
    assert api.post("/v1/hosts/heartbeat", json=_beat("h2"), headers=_auth(T2)).status_code == 200
    assert _hosts(api)["h2"]["state"] == "up"


def test_a_malformed_first_registration_joins_unhealthy(api: FlaskClient, sched: Scheduler) -> None:
    alice = sched.users.add("alice")["token"]
    bad = {**GOOD, "images": {"not": "a list"}}
    api.post("/v1/hosts/heartbeat", json=_beat("h2", bad), headers=_auth(T2))
    r = api.post("/v1/hosts/register", json=_reg("h9", T2 + "9", 7429, bad), headers=_auth(JOIN))
    assert r.status_code == 200 and "images must be a list" in r.json["report_error"]
    hosts = _hosts(api)
    assert hosts["h9"]["state"] == "unhealthy" and "images" not in hosts["h9"]
    _still_fine_for_others(api, alice)


def test_a_stored_report_from_before_checks_breaks_nothing(
    api: FlaskClient, sched: Scheduler
) -> None:
    """A record written by an older scheduler (which stored reports unchecked)."""
    alice = sched.users.add("alice")["token"]
    with sched.store.lock:
        sched.store.db.table("hosts").update(
            "h2", {"info": json.dumps({"images": "x", "total": {"cpus": "y"}, "state": "down"})}
        )
        sched.pool._bump()  # as any write does
    assert _hosts(api)["h2"]["state"] == "up" and "images" not in _hosts(api)["h2"]
    r = api.get("/v1/images", headers=_auth(alice))
    assert r.status_code == 200 and {i["name"]: i["hosts"] for i in r.json} == {IMAGE: ["h1"]}
    body = {"name": "probe", "os_prefix": "debian-12:amd64"}
    r = api.post("/v1/envs?dry_run=1", json=body, headers=_auth(alice))
    assert r.status_code == 200 and r.json["hosts"] == {"h1": 1}, r.text
    assert api.get("/metrics").status_code == 200


def test_a_static_host_with_a_malformed_report(tmp_path: Path) -> None:
    s = Scheduler(tmp_path, {"s1": ("http://127.0.0.1:9", "t" * 20)}, admin_token=ADMIN)

    class Fake:
        def info(self) -> dict[str, Any]:
            return {**GOOD, "images": [{"name": IMAGE, "disk_gib": float("inf")}], "url": 1}

    s.pool.client = lambda hid: Fake()  # type: ignore[assignment,method-assign,return-value]
    s.pool.poll_static()
    (h,) = s.pool.public_all()
    assert h["state"] == "unhealthy" and h["url"] == "http://127.0.0.1:9"
    assert s.images() == [] and all(not v.up for v in s.pool.views({}))
    s.stop()


def test_users_see_no_host_addresses(api: FlaskClient, sched: Scheduler) -> None:
    alice = sched.users.add("alice")["token"]
    sched.pool.mark_unreachable("h2", "host h2 (http://127.0.0.1:7422) is unreachable: 127.0.0.1")
    mine = _hosts(api, alice)
    assert all("url" not in h for h in mine.values())
    assert "127.0.0.1" not in json.dumps(mine)
    assert "(host address)" in mine["h2"]["error"]
    theirs = _hosts(api, ADMIN)
    assert theirs["h1"]["url"] == "http://127.0.0.1:7421"
    assert "127.0.0.1:7422" in theirs["h2"]["error"]
    assert "token" not in json.dumps(theirs) and T1 not in json.dumps(theirs)


# -- the joiner, for real ----------------------------------------------------------------------
@pytest.fixture
def live(sched: Scheduler) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, create_app(sched), threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    t.join()


def _joiner(url: str, token: str, info: dict[str, Any] | None = None) -> Joiner:
    return Joiner(
        scheduler=url,
        join_token=JOIN,
        host_id="hj",
        advertise_url="http://127.0.0.1:7450",
        host_token=token,
        info=lambda: dict(GOOD if info is None else info),
    )


def test_the_joiner_beats_with_its_own_token_and_an_impostor_is_refused(
    live: str, sched: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    real = _joiner(live, T1)
    real.register()
    real.beat()
    assert sched.pool.row("hj")["state"] == "up"
    impostor = _joiner(live, T2, {**GOOD, "images": []})
    with pytest.raises(JoinRefused, match="registered by another host"):
        impostor.register()
    with pytest.raises(JoinRefused, match="does not bear host hj's token"):
        impostor.beat()
    assert [i["name"] for i in sched.pool.public_all()[0]["images"]] == [IMAGE]
    bad = _joiner(live, T1, {**GOOD, "total": {"cpus": "many"}})
    bad.beat()  # joined, but unhealthy: the host's log says why
    assert sched.pool.row("hj")["state"] == "unhealthy"
    assert "refused our report" in caplog.text and "total.cpus" in caplog.text
