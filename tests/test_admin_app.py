"""The admin page's server side through Flask's test client, on a real scheduler state (SQLite)
with registered fake hosts and many ENVs: login, CSRF, no secrets, actions, huge lists. The
browser tests against real VMs are in test_admin_browser.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import xml.etree.ElementTree as ET  # our own SVG output, not untrusted input
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.admin_fake import HOST_TOKEN, fake_scheduler, queue_requests
from ttci.scheduler import history
from ttci.scheduler.admin import plots
from ttci.scheduler.admin.state import MAX_VMS_SHOWN
from ttci.scheduler.core import EnvNotFound
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app

ADMIN = "admin-secret-" + "a" * 24


@pytest.fixture
def sched(tmp_path: Path, database: str) -> Iterator[Scheduler]:
    s = fake_scheduler(tmp_path, ADMIN, vms=40, per_env=2, hosts=2, jobs=30, database=database)
    yield s
    s.close()


def _svg(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html
    )
    assert m, html[:500]
    return m[1]


def _login(c: FlaskClient, token: str = ADMIN) -> str:
    """Log in as a browser does; returns the page's CSRF token."""
    token_field = _csrf(c.get("/admin/login").text)
    r = c.post("/admin/login", data={"token": token, "csrf_token": token_field})
    assert r.status_code == 302, r.text
    page = c.get("/admin/")
    assert page.status_code == 200
    return _csrf(page.text)


def _left(expires_at: str) -> float:
    return (dt.datetime.fromisoformat(expires_at) - dt.datetime.now(dt.UTC)).total_seconds()


def test_everything_needs_a_login(sched: Scheduler) -> None:
    c = create_app(sched).test_client()
    r = c.get("/admin/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/admin/login")
    r = c.get("/admin/api/state")
    assert r.status_code == 401 and "not logged in" in r.json["error"]
    # A CSRF token alone (from the login page) does not make an action allowed.
    token = _csrf(c.get("/admin/login").text)
    r = c.post("/admin/api/envs/ci-00000/delete", headers={"X-CSRFToken": token})
    assert r.status_code == 401
    assert sched.show_env("ci-00000", sched.users.resolve(ADMIN))["state"] == "ready"


def test_wrong_and_non_admin_tokens_are_refused(sched: Scheduler) -> None:
    c = create_app(sched).test_client()
    token = _csrf(c.get("/admin/login").text)
    r = c.post("/admin/login", data={"token": "nope", "csrf_token": token})
    assert r.status_code == 401 and "wrong or missing token" in r.text
    assert "nope" not in r.text
    user = sched.users.add("alice")
    r = c.post("/admin/login", data={"token": user["token"], "csrf_token": token})
    assert r.status_code == 401 and "not an admin" in r.text
    assert c.get("/admin/api/state").status_code == 401


def test_forged_requests_are_refused(sched: Scheduler) -> None:
    c = create_app(sched).test_client()
    _login(c)
    for headers in ({}, {"X-CSRFToken": "forged"}):
        r = c.post("/admin/api/envs/ci-00000/delete", headers=headers)
        assert r.status_code == 400, r.text
        assert "refused" in r.json["error"] and "reload the admin page" in r.json["hint"]
        r = c.post("/admin/api/hosts/fake-0/drain", json={"drained": True}, headers=headers)
        assert r.status_code == 400
    admin = sched.users.resolve(ADMIN)
    assert sched.show_env("ci-00000", admin)["state"] == "ready"
    assert not any(h["drained"] for h in sched.hosts())
    # A login form posted from elsewhere (no CSRF token) is refused too.
    r = create_app(sched).test_client().post("/admin/login", data={"token": ADMIN})
    assert r.status_code == 400


def test_no_secret_is_ever_rendered(sched: Scheduler) -> None:
    user = sched.users.add("bob")
    c = create_app(sched).test_client()
    _login(c)
    pages = [c.get("/admin/").text, c.get("/admin/api/state").text, c.get("/metrics").text]
    pages.append(c.get("/admin/login").text)
    for text in pages:
        for secret in (ADMIN, HOST_TOKEN, user["token"]):
            assert secret not in text
    assert "token" not in json.dumps(c.get("/admin/api/state").json["hosts"])
    cookie = c.get_cookie("tt_admin", path="/")
    assert cookie is not None and ADMIN not in cookie.value
    assert cookie.http_only and cookie.same_site == "Strict"


def test_state_shows_hosts_envs_origins_jobs_and_plots(sched: Scheduler) -> None:
    c = create_app(sched).test_client()
    _login(c)
    st = c.get("/admin/api/state").json
    assert [h["id"] for h in st["hosts"]] == ["fake-0", "fake-1"]
    assert {h["accel"] for h in st["hosts"]} == {"kvm", "tcg"}
    assert st["hosts"][0]["total"]["cpus"] == 64
    assert [h["vms"] for h in st["hosts"]] == [20, 20]  # from the scheduler's own VM records
    assert st["env_total"] == 20 and st["vm_total"] == 40
    env = next(e for e in st["envs"] if e["name"] == "ci-00002")
    assert env["origin"]["kind"] == "jenkins"
    assert env["origin"]["url"] == "https://ci.example.org/jenkins/jobs/1002"
    assert [v["state"] for v in env["vms"]] == ["running", "running"]
    assert len(st["jobs"]) == 30 and st["jobs"][0]["result"] in history.RESULTS
    for svg in st["plots"].values():
        assert _svg(svg).tag.endswith("svg")
    assert [i["name"] for i in st["images"]] == [
        "qemu:debian-12:amd64",
        "qemu:debian-12:arm64",
        "qemu:debian-13:amd64",
    ]


def test_actions_and_things_that_no_longer_exist(sched: Scheduler) -> None:
    admin = sched.users.resolve(ADMIN)
    with sched.store.lock:  # an ENV without VMs, so deleting it needs no host
        sched.store.db.table("envs").insert(
            {**sched.store.db.table("envs").get("ci-00000"), "name": "empty", "origin": "{}"}
        )
    c = create_app(sched).test_client()
    csrf = {"X-CSRFToken": _login(c)}
    before = sched.show_env("ci-00001", admin)["expires_at"]
    r = c.post("/admin/api/envs/ci-00001/extend", json={"life_time": "2h"}, headers=csrf)
    assert r.status_code == 200, r.text
    assert sched.show_env("ci-00001", admin)["expires_at"] > before
    left = _left(sched.show_env("ci-00001", admin)["expires_at"])
    r = c.post("/admin/api/envs/ci-00001/extend", json={"add": "1h"}, headers=csrf)
    assert r.status_code == 200  # the +1 h button: an hour on top of what was left
    assert 3590 <= _left(r.json["result"]["expires_at"]) - left <= 3610
    r = c.post("/admin/api/envs/ci-00001/extend", json={"life_time": "soon"}, headers=csrf)
    assert r.status_code == 400 and "does not parse" in r.json["error"]

    r = c.post("/admin/api/hosts/fake-1/drain", json={"drained": True}, headers=csrf)
    assert r.status_code == 200 and r.json["result"]["drained"] is True
    assert c.get("/admin/api/state").json["hosts"][1]["drained"] is True
    r = c.post("/admin/api/hosts/fake-1/drain", json={"drained": False}, headers=csrf)
    assert r.status_code == 200 and r.json["result"]["drained"] is False
    r = c.post("/admin/api/hosts/gone/drain", json={"drained": True}, headers=csrf)
    assert r.status_code == 404 and "no host 'gone'" in r.json["error"]

    r = c.post("/admin/api/envs/empty/delete", headers=csrf)
    assert r.status_code == 200, r.text
    r = c.post("/admin/api/envs/empty/delete", headers=csrf)
    assert r.status_code == 404 and "no ENV named 'empty'" in r.json["error"]
    r = c.post("/admin/api/envs/gone/extend", json={"life_time": "1h"}, headers=csrf)
    assert r.status_code == 404
    assert "empty" not in [e["name"] for e in c.get("/admin/api/state").json["envs"]]


def test_queue_section_shows_every_waiting_request(sched: Scheduler) -> None:
    queue_requests(sched)
    c = create_app(sched).test_client()
    _login(c)
    page = c.get("/admin/").text
    assert 'id="queue"' in page and 'id="quotas"' in page and 'id="quota-form"' in page
    st = c.get("/admin/api/state").json
    assert st["counts"]["queued"] == 3
    q = {w["env"]: w for w in st["queue"]}
    assert [w["env"] for w in st["queue"]] == ["big", "q1", "q2"]
    assert [w["position"] for w in st["queue"]] == [1, 2, 3]
    big, q2 = q["big"], q["q2"]
    assert (big["owner"], big["project"], big["kind"]) == ("bob", "gitlab:g/p", "gitlab")
    assert big["blocked_by"] == "capacity" and big["reserved"] is True
    assert "needs 60 CPU" in big["detail"] and big["needs"]["cpus"] == 60 and big["vms"] == 1
    assert (q2["owner"], q2["project"], q2["kind"], q2["vms"]) == ("alice", "user:alice", "cli", 2)
    assert q2["blocked_by"] == "quota" and "user alice uses 0 of 0 VMs" in q2["detail"]
    for w in st["queue"]:  # when it was queued, so the page counts the wait up by itself
        assert 0 <= (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(w["since"])).seconds < 60
        assert w["waited_s"] >= 0
    # Queued ENVs are in the ENV list too, in state "queued".
    assert {e["name"]: e["state"] for e in st["envs"]}["big"] == "queued"
    assert st["quotas"] == [
        {
            "scope": "user",
            "name": "alice",
            "vms": 0,
            "cpus": None,
            "priority": None,
            "used_vms": 0,
            "used_cpus": 0.0,
        }
    ]


def test_cancel_takes_a_request_out_of_the_queue(sched: Scheduler) -> None:
    queue_requests(sched)
    admin = sched.users.resolve(ADMIN)
    c = create_app(sched).test_client()
    csrf = {"X-CSRFToken": _login(c)}
    r = c.post("/admin/api/queue/q1/cancel", headers={"X-CSRFToken": "forged"})
    assert r.status_code == 400 and "refused" in r.json["error"]
    assert sched.show_env("q1", admin)["state"] == "queued"
    r = c.post("/admin/api/queue/q1/cancel", headers=csrf)
    assert r.status_code == 200, r.text
    assert r.json["result"] == {"name": "q1", "cancelled": True}
    with pytest.raises(EnvNotFound):
        sched.show_env("q1", admin)  # nothing left: no ENV row, no queue row
    sched.dispatch()  # as the dispatcher does within half a second
    st = c.get("/admin/api/state").json
    assert [(w["env"], w["position"]) for w in st["queue"]] == [("big", 1), ("q2", 2)]
    assert "q1" not in [e["name"] for e in st["envs"]]
    r = c.post("/admin/api/queue/q1/cancel", headers=csrf)
    assert r.status_code == 404 and "q1" in r.json["error"]
    r = c.post("/admin/api/queue/ci-00000/cancel", headers=csrf)  # ready, not queued
    assert r.status_code == 409 and "no longer queued" in r.json["error"]
    assert sched.show_env("ci-00000", admin)["state"] == "ready"


def test_quotas_are_set_and_removed_from_the_page(sched: Scheduler) -> None:
    queue_requests(sched)
    c = create_app(sched).test_client()
    csrf = {"X-CSRFToken": _login(c)}
    body = {"scope": "project", "name": "gitlab:g/p", "vms": 3, "cpus": 2.5, "priority": 5}
    r = c.post("/admin/api/quotas", json=body, headers={"X-CSRFToken": "forged"})
    assert r.status_code == 400
    r = c.post("/admin/api/quotas", json=body, headers=csrf)
    assert r.status_code == 200, r.text
    kind = {"scope": "kind", "name": "cli", "priority": 1}
    assert c.post("/admin/api/quotas", json=kind, headers=csrf).status_code == 200
    rows = {(q["scope"], q["name"]): q for q in c.get("/admin/api/state").json["quotas"]}
    assert set(rows) == {("user", "alice"), ("project", "gitlab:g/p"), ("kind", "cli")}
    assert rows[("project", "gitlab:g/p")] == {**body, "used_vms": 0, "used_cpus": 0.0}
    assert rows[("kind", "cli")]["priority"] == 1
    # The fake ENVs (owner admin, no project recorded) count for user admin.
    mine = {"scope": "user", "name": "admin", "vms": 50}
    assert c.post("/admin/api/quotas", json=mine, headers=csrf).status_code == 200
    row = next(q for q in c.get("/admin/api/state").json["quotas"] if q["name"] == "admin")
    assert (row["used_vms"], row["vms"], row["used_cpus"]) == (40, 50, 40.0)
    for bad in ({"scope": "planet", "name": "x"}, {"scope": "kind", "name": "cli", "vms": 1}):
        r = c.post("/admin/api/quotas", json=bad, headers=csrf)
        assert r.status_code == 400 and r.json["hint"]
    r = c.post("/admin/api/quotas/delete", json={"scope": "user", "name": "alice"}, headers=csrf)
    assert r.status_code == 200, r.text
    r = c.post("/admin/api/quotas/delete", json={"scope": "user", "name": "alice"}, headers=csrf)
    assert r.status_code == 404
    assert ("user", "alice") not in {
        (q["scope"], q["name"]) for q in c.get("/admin/api/state").json["quotas"]
    }


def test_logout_ends_the_session_on_the_server(sched: Scheduler) -> None:
    c = create_app(sched).test_client()
    csrf = _login(c)
    cookie = c.get_cookie("tt_admin", path="/")
    assert cookie is not None
    assert c.post("/admin/logout", data={"csrf_token": csrf}).status_code == 302
    # The old cookie, replayed, no longer opens anything.
    c2 = create_app(sched).test_client()
    c2.set_cookie("tt_admin", cookie.value, path="/")
    assert c2.get("/admin/api/state").status_code == 401
    assert c.get("/admin/api/state").status_code == 401


def test_huge_lists_are_capped_and_filterable(tmp_path: Path) -> None:
    s = fake_scheduler(tmp_path, ADMIN, vms=MAX_VMS_SHOWN + 1000, per_env=10, jobs=0)
    c = create_app(s).test_client()
    _login(c)
    st = c.get("/admin/api/state").json
    assert st["vm_total"] == MAX_VMS_SHOWN + 1000 and st["vm_shown"] == MAX_VMS_SHOWN
    assert st["env_total"] == len(st["envs"]) == (MAX_VMS_SHOWN + 1000) // 10
    assert sum(e["vm_count"] for e in st["envs"]) == MAX_VMS_SHOWN + 1000
    st = c.get("/admin/api/state?q=ci-00599").json
    assert [e["name"] for e in st["envs"]] == ["ci-00599"] and len(st["envs"][0]["vms"]) == 10
    st = c.get("/admin/api/state?q=JOBS/1003").json  # origin links are searchable too
    assert [e["name"] for e in st["envs"]] == ["ci-00003"]
    s.stop()


def test_job_results_are_recorded_for_the_owner_only(sched: Scheduler) -> None:
    alice, bob = sched.users.add("alice"), sched.users.add("bob")
    with sched.store.lock:
        sched.store.db.table("envs").insert(
            {**sched.store.db.table("envs").get("ci-00000"), "name": "alices", "owner": "alice"}
        )
    history.env_ready(sched.store, "alices")
    c = create_app(sched).test_client()

    def post(token: str, body: object, name: str = "alices") -> tuple[int, dict[str, object]]:
        r = c.post(
            f"/v1/envs/{name}/result", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        return r.status_code, r.json or {}

    assert post(bob["token"], {"result": "success"})[0] == 404
    status, body = post(alice["token"], {"result": "maybe"})
    assert status == 400 and "success, failed, cancelled, error" in str(body["error"])
    assert post(alice["token"], {})[0] == 400
    status, body = post(alice["token"], {"result": "failed"})
    assert status == 200 and body["result"] == "failed" and body["owner"] == "alice"
    history.env_deleted(sched.store, "alices")  # still reportable after the ENV is gone
    assert post(ADMIN, {"result": "cancelled"})[1]["result"] == "cancelled"
    assert post(ADMIN, {"result": "success"}, name="never-was")[0] == 404
    mine = c.get("/v1/jobs", headers={"Authorization": f"Bearer {alice['token']}"}).json
    assert [(j["env"], j["result"]) for j in mine] == [("alices", "cancelled")]
    assert mine[0]["deleted_at"]


def test_plots_are_valid_svg_and_escape_labels() -> None:
    t0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    iso = lambda s: (t0 + dt.timedelta(seconds=s)).isoformat()  # noqa: E731
    jobs = [  # two 1-CPU jobs overlapping for 10 s inside one slice, one 4-CPU job still running
        {"created_at": iso(100), "deleted_at": iso(130), "cpus": 1.0},
        {"created_at": iso(110), "deleted_at": iso(120), "cpus": 1.0},
        {"created_at": iso(1800), "deleted_at": "", "cpus": 4.0},
    ]
    pts = plots.pool_use(jobs, t0.timestamp(), t0.timestamp() + 3600, steps=60)
    assert max(p.v for p in pts[:3]) == 2.0  # the peak, though no sample instant hits it
    assert pts[-1].v == 4.0 and pts[29].v == 0.0
    svg = plots.line_plot("use", pts, capacity=8)
    assert _svg(svg).attrib["viewBox"] == "0 0 560 180"
    evil = [{"env": "<script>x</script>", "kind": "cli", "vm_count": 1, "ready_s": 3.0}]
    svg = plots.bar_plot("latency", plots.latency_bars(evil))
    assert "<script>" not in svg and _svg(svg) is not None
    assert "no jobs yet" in plots.bar_plot("latency", [])
