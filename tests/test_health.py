"""Liveness and readiness, one convention on every daemon: GET /healthz (alive) and GET /readyz
(200, or 503 with a JSON body naming each check and what failed); the old /v1/health stays.

The apps are the real ones (Flask test clients) over real SQLite state; what fails is made to
fail for real: a database switched to read-only, a libvirt that refuses, a scheduler nobody
answers at. The daemons themselves answer /readyz in tests/test_units.py (started from their
systemd units' ExecStart lines)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flask import Flask

from hostd.service import api as hostd_api
from hostd.service.joiner import Joiner
from hostd.vm.engine import EngineError
from hostd.vm.schema import open_store
from ttci import __version__
from ttci.infra.health import readiness
from ttci.model.errors import TTError
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web import api as sched_api
from webhooks.app import create_app as webhooks_app
from webhooks.metrics import Metrics
from webhooks.store import JobStore

ADMIN = "admin-secret-" + "h" * 24
HOSTD_TOKEN = "hostd-token-" + "t" * 20


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[Scheduler]:
    s = Scheduler(tmp_path / "sched", {}, admin_token=ADMIN, host_timeout=3600)
    yield s
    s.stop()


def _read_only(store: Any, on: bool) -> None:
    with store.lock:
        store.db.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


def test_scheduler_is_alive_and_ready(scheduler: Scheduler) -> None:
    c = sched_api.create_app(scheduler).test_client()
    r = c.get("/healthz")  # no token: a probe has none
    assert r.status_code == 200
    assert r.json == {"ok": True, "program": "tt-scheduler", "version": __version__}
    assert c.get("/v1/health").json == {"ok": True, "version": __version__}  # the old path
    r = c.get("/readyz")
    assert r.status_code == 200, r.json
    body = r.json
    assert body["ready"] is True and body["failed"] == []
    assert body["checks"]["database"]["ok"] and body["checks"]["hosts"]["detail"] == "0 of 0 up"


def test_scheduler_not_ready_when_its_database_takes_no_write(scheduler: Scheduler) -> None:
    c = sched_api.create_app(scheduler).test_client()
    _read_only(scheduler.store, True)
    try:
        r = c.get("/readyz")
    finally:
        _read_only(scheduler.store, False)
    assert r.status_code == 503
    assert r.json["ready"] is False and r.json["failed"] == ["database"]
    assert "readonly" in r.json["checks"]["database"]["error"]
    assert c.get("/healthz").status_code == 200  # alive all the same
    assert c.get("/readyz").status_code == 200  # and ready again


class _Engine:
    def __init__(self) -> None:
        self.down = False

    def check(self) -> str:
        if self.down:
            raise EngineError("libvirt: Failed to connect socket to '/run/libvirt/libvirt-sock'")
        return "libvirt 9000000, qemu 7002000"


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[tuple[Flask, Any]]:
    mgr = SimpleNamespace(store=open_store(tmp_path), engine=_Engine())
    yield hostd_api.create_app(cast(Any, mgr), HOSTD_TOKEN), mgr


def test_hostd_ready_checks_its_database_libvirt_and_scheduler(hostd: tuple[Flask, Any]) -> None:
    app, mgr = hostd
    c = app.test_client()
    assert c.get("/healthz").json["program"] == "tt-hostd"
    r = c.get("/readyz")
    assert r.status_code == 200, r.json
    checks = r.json["checks"]
    assert checks["libvirt"]["detail"].startswith("libvirt ")
    assert checks["scheduler"]["detail"].startswith("not joined")  # a static host
    mgr.engine.down = True
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json["failed"] == ["libvirt"]
    assert "Failed to connect" in r.json["checks"]["libvirt"]["error"]
    _read_only(mgr.store, True)
    try:
        assert c.get("/readyz").json["failed"] == ["database", "libvirt"]
    finally:
        _read_only(mgr.store, False)


def test_hostd_joined_is_ready_only_while_the_scheduler_answers(hostd: tuple[Flask, Any]) -> None:
    app, _ = hostd
    joiner = Joiner(
        scheduler="http://127.0.0.1:9",  # nobody answers there
        join_token="j" * 20,
        host_id="h1",
        advertise_url="http://127.0.0.1:7420",
        host_token=HOSTD_TOKEN,
        info=dict,
    )
    app.config["JOINER"] = joiner
    c = app.test_client()
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json["failed"] == ["scheduler"]
    assert r.json["checks"]["scheduler"]["error"].startswith("not joined yet")
    joiner.last_ok = time.monotonic()  # the scheduler answered a heartbeat just now
    assert c.get("/readyz").status_code == 200
    joiner.last_ok, joiner.last_error = time.monotonic() - 3600, "connection refused"
    r = c.get("/readyz")
    assert r.status_code == 503
    assert "no answer from the scheduler for 3600 s: connection refused" in str(r.json)


class _Scheduler:
    def __init__(self) -> None:
        self.up = True

    def status(self) -> dict[str, Any]:
        if not self.up:
            raise TTError("cannot reach the scheduler at http://127.0.0.1:9")
        return {"user": "github", "hosts_up": 2}


def test_webhook_service_ready_checks_its_database_and_the_scheduler(tmp_path: Path) -> None:
    tt = _Scheduler()
    svc = SimpleNamespace(store=JobStore(tmp_path / "github.db"), tt=tt, metrics=Metrics())
    c = webhooks_app(cast(Any, svc), b"secret").test_client()
    assert c.get("/healthz").json["program"] == "tt-github-webhooks"
    r = c.get("/readyz")
    assert r.status_code == 200, r.json
    assert r.json["checks"]["scheduler"]["detail"] == "answers (as github, 2 hosts up)"
    tt.up = False
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json["failed"] == ["scheduler"]
    assert "cannot reach the scheduler" in r.json["checks"]["scheduler"]["error"]
    assert "ttci_build_info" in c.get("/metrics").text


def test_a_hung_check_is_a_failure_that_says_so() -> None:
    t0 = time.monotonic()
    body, status = readiness({"slow": lambda: time.sleep(5), "fast": lambda: "fine"}, timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert status == 503 and body["failed"] == ["slow"]
    assert body["checks"]["slow"]["error"] == "no answer within 0.3 s"
    assert body["checks"]["fast"]["ok"] and body["checks"]["fast"]["detail"] == "fine"
