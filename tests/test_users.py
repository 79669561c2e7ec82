"""Users against each other: CI ENV names are reserved to their service's account, an admin page
session dies with its user, and failed admin logins are throttled per address without a worker
ever sleeping. A real scheduler state (SQLite) through Flask's test client; no VMs."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.standin_hostd import instant_hostd
from ttci.scheduler.service import Scheduler
from ttci.scheduler.users import LoginThrottle, User, check_env_name, reserved_for
from ttci.scheduler.web.api import create_app
from ttci.wire.api import API_VERSION

ADMIN = "admin-" + secrets.token_urlsafe(16)
JOIN = "join-" + secrets.token_urlsafe(16)
INFO = {
    "total": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
    "free": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
    "images": [{"name": "qemu:debian-12:amd64", "disk_gib": 4}],
}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def stand_in() -> Iterator[str]:
    """A hostd stand-in that creates and deletes VMs at once (nothing is booted)."""
    with instant_hostd(INFO) as url:
        yield url


@pytest.fixture
def sched(tmp_path: Path, stand_in: str, database: str) -> Iterator[Scheduler]:
    s = Scheduler(
        tmp_path, {}, admin_token=ADMIN, join_token=JOIN, host_timeout=3600, database=database
    )
    reg = {"api": API_VERSION, "id": "h1", "url": stand_in, "token": "h" * 20, "info": INFO}
    r = create_app(s).test_client().post("/v1/hosts/register", json=reg, headers=_auth(JOIN))
    assert r.status_code == 200, r.text
    yield s
    s.close()


@pytest.fixture
def api(sched: Scheduler) -> FlaskClient:
    return create_app(sched).test_client()


def _add_user(api: FlaskClient, name: str, **extra: Any) -> str:
    r = api.post("/v1/users", json={"name": name, **extra}, headers=_auth(ADMIN))
    assert r.status_code == 201, r.text
    token: str = r.json["token"]
    return token


def _create(api: FlaskClient, token: str, name: str) -> Any:
    body = {"name": name, "os_prefix": "debian-12:amd64", "wait": False}
    return api.post("/v1/envs", json=body, headers=_auth(token))


# -- ENV names ----------------------------------------------------------------------------------
def test_reserved_names_are_exactly_what_the_ci_drivers_use() -> None:
    from runner_executor.core.job import env_name as gitlab_name
    from webhooks.core.jobs import env_name as github_name

    assert reserved_for(gitlab_name({"CI_JOB_ID": "123456"})) == "gitlab"
    assert reserved_for(github_name(987, 2)) == "github"
    for free in ("gl-abc", "gl-", "glx-1", "gh-1", "gh-1-x", "ci-42", "gl-1-2", "my-gl-1"):
        assert reserved_for(free) is None, free
    check_env_name(User("alice"), "gl-abc")
    check_env_name(User("root", admin=True), "gl-1")
    check_env_name(User("ci", service="gitlab"), "gl-1")


@pytest.mark.parametrize("name", ["gl-123", "gh-77-1"])
def test_a_user_cannot_squat_a_ci_name(api: FlaskClient, sched: Scheduler, name: str) -> None:
    alice = _add_user(api, "alice")
    r = _create(api, alice, name)
    assert r.status_code == 403, r.text
    assert "reserved" in r.json["error"] and r.json["kind"] == "NameReserved"
    assert api.get(f"/v1/envs/{name}", headers=_auth(ADMIN)).status_code == 404
    assert api.get("/v1/queue", headers=_auth(ADMIN)).json == []


def test_each_service_gets_its_own_names_and_admins_any(api: FlaskClient) -> None:
    gitlab = _add_user(api, "gitlab", service="gitlab")
    github = _add_user(api, "github", service="github")
    assert _create(api, gitlab, "gh-5-1").status_code == 403
    assert _create(api, github, "gl-5").status_code == 403
    allowed = [
        (gitlab, "gl-5", "gitlab"),
        (github, "gh-5-1", "github"),
        (ADMIN, "gl-6", "admin"),
        (ADMIN, "gh-6-1", "admin"),
    ]
    for token, name, owner in allowed:
        r = _create(api, token, name)
        assert r.status_code == 201 and r.json["state"] == "ready", r.text
        assert r.json["owner"] == owner
    users = {u["name"]: u for u in api.get("/v1/users", headers=_auth(ADMIN)).json}
    assert users["gitlab"]["service"] == "gitlab" and users["github"]["service"] == "github"


def test_an_unknown_or_malformed_service_is_refused(api: FlaskClient) -> None:
    for service in ("jenkins", 1, ["gitlab"]):
        r = api.post("/v1/users", json={"name": "x", "service": service}, headers=_auth(ADMIN))
        assert r.status_code == 400, r.text
    alice = _add_user(api, "alice")
    r = api.post("/v1/users", json={"name": "y", "service": "gitlab"}, headers=_auth(alice))
    assert r.status_code == 403


# -- admin page sessions ------------------------------------------------------------------------
def _csrf(html: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html
    )
    assert m, html[:300]
    return m[1]


def _admin_app(api: FlaskClient) -> Flask:
    app: Flask = api.application.wsgi_app.next.mounts["/admin"].__self__  # type: ignore[attr-defined]
    return app


def _try_login(c: FlaskClient, token: str, addr: str = "10.0.0.1") -> Any:
    form = {"token": token, "csrf_token": _csrf(c.get("/admin/login").text)}
    return c.post("/admin/login", data=form, environ_base={"REMOTE_ADDR": addr})


def test_a_deleted_users_admin_session_stops_working(api: FlaskClient, sched: Scheduler) -> None:
    boss = _add_user(api, "boss", admin=True)
    browser = create_app(sched).test_client()
    assert _try_login(browser, boss).status_code == 302
    assert browser.get("/admin/api/state").status_code == 200
    assert api.delete("/v1/users/boss", headers=_auth(ADMIN)).status_code == 200
    r = browser.get("/admin/api/state")
    assert r.status_code == 401 and "not logged in" in r.json["error"]
    assert browser.get("/admin/").status_code == 302
    # A new user of the same name has another token: the old session stays dead.
    _add_user(api, "boss", admin=True)
    assert browser.get("/admin/api/state").status_code == 401
    # The --admin-token's session lives on (and is checked the same way).
    other = create_app(sched).test_client()
    assert _try_login(other, ADMIN).status_code == 302
    assert other.get("/admin/api/state").status_code == 200


def test_failed_logins_are_throttled_per_address_without_sleeping(api: FlaskClient) -> None:
    clock = [1000.0]
    _admin_app(api).config["ADMIN_THROTTLE"] = LoginThrottle(clock=lambda: clock[0])
    started = time.monotonic()
    for _ in range(5):
        r = _try_login(api, "guess-" + secrets.token_urlsafe(8))
        assert r.status_code == 401 and "wrong or missing token" in r.text
    r = _try_login(api, "guess-6")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 3  # answered at once (it slept 0.3 s per try before)
    # While locked, even the right token is not looked at.
    r = _try_login(api, ADMIN)
    assert r.status_code == 429 and "try again in 1 s" in r.text
    # Another address is not affected.
    assert _try_login(api, ADMIN, addr="10.0.0.2").status_code == 302
    # Each further failure doubles the wait.
    clock[0] += 1.5
    assert _try_login(api, "guess-7").headers["Retry-After"] == "2"
    clock[0] += 2.5
    assert _try_login(api, "guess-8").headers["Retry-After"] == "4"
    clock[0] += 4.5
    assert _try_login(api, ADMIN).status_code == 302  # a success clears the address
    assert _try_login(api, "guess-9").status_code == 401


def test_the_throttle_forgets_and_stays_bounded() -> None:
    clock = [0.0]
    t = LoginThrottle(free=2, max_lock_s=60, window_s=100, max_keys=50, clock=lambda: clock[0])
    assert t.failed("a") == 0 and t.failed("a") == 0 and t.failed("a") == 1
    for _ in range(20):
        clock[0] += 61
        t.failed("a")
    assert t.retry_after("a") == 60  # capped
    clock[0] += 1000  # a quiet while: the count starts again
    assert t.failed("a") == 0 and t.retry_after("a") == 0
    for n in range(10_000):
        t.failed(f"10.{n}")
    assert len(t._keys) == 50
