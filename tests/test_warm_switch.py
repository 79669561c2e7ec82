"""Turning warm start off, for one ENV or for a host, on `tt up`'s real stack (scheduler, hostd,
private libvirtd, real VMs under TCG), and seeing it: the first VM of a size boots cold and its
template is made in the background; `tt image list` then says the image starts warm; the next
ENV's VM is a restored clone; `tt env add --cold` boots a VM cold (GitLab: TT_COLD=1) even so.
A host started with --no-warm (TT_HOSTD_WARM=false) makes no template, boots every VM cold,
and `tt image list` says why."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from runner_executor.core import job
from tests.cloudutil import small_cloud, tt
from tests.conftest import built_image

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
IMAGE = "qemu:debian-12:amd64"


def _hostd_rows(state: Path, table: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(state / "hostd" / "hostd.db", timeout=5)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"select * from {table}")]  # noqa: S608


def _add(cfg: Path, name: str, *extra: str) -> dict[str, Any]:
    r = tt(
        "env", "add", name, "--os-prefix", "debian-12:amd64", "--memory", "512", "--json",
        *extra, config=cfg, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    env: dict[str, Any] = json.loads(r.stdout)
    return env


def _vm(state: Path, env: str) -> dict[str, Any]:
    (row,) = [r for r in _hostd_rows(state, "vms") if r["env"] == env]
    return row


def _image_start(cfg: Path) -> dict[str, Any]:
    r = tt("image", "list", "--json", config=cfg, timeout=60)
    assert r.returncode == 0, r.stderr
    warm: dict[str, Any] = {i["name"]: i for i in json.loads(r.stdout)}[IMAGE]["warm"]
    return warm


def _wait_warm(cfg: Path, timeout: float = 240) -> dict[str, Any]:
    """Until the pool's image list says the image starts warm (hostd made its template)."""
    deadline = time.monotonic() + timeout
    while True:
        warm = _image_start(cfg)
        if warm["start"] == "warm" or time.monotonic() > deadline:
            return warm
        time.sleep(2)


def test_warm_then_cold_on_request(tmp_path: Path) -> None:
    built_image("debian-12", "amd64")
    with small_cloud(tmp_path, mem_total=3072) as stack:
        cfg = tmp_path / "client.json"
        _add(cfg, "first")
        first = _vm(tmp_path, "first")
        assert first["start"] == "cold" and "no template yet" in first["warm_why"]
        warm = _wait_warm(cfg)
        assert warm["start"] == "warm" and warm["warm_hosts"] == ["local"], warm
        _add(cfg, "second")
        second = _vm(tmp_path, "second")
        assert second["start"] == "warm" and second["template"], second
        _add(cfg, "third", "--cold")
        third = _vm(tmp_path, "third")
        assert third["start"] == "cold" and third["template"] == "", third
        assert third["warm_why"] == "the request asked for a cold boot"
        # A cold boot's console shows its agent starting; a clone's starts after its restore.
        consoles = {
            n: (Path(_vm(tmp_path, n)["workdir"]) / "console.log").read_text(errors="replace")
            for n in ("second", "third")
        }
        assert "tt-agent" in consoles["third"] and "tt-agent" not in consoles["second"]
        listed = tt("env", "list", config=cfg).stdout  # the ENVs are there, all three
        assert all(n in listed for n in ("first", "second", "third"))
        for name in ("first", "second", "third"):
            assert tt("env", "del", name, config=cfg).returncode == 0
        assert stack.hostd_proc.poll() is None


def test_gitlab_tt_cold_asks_for_a_cold_boot() -> None:
    jv = {"CI_JOB_ID": "77", "CI_PROJECT_PATH": "g/p"}
    size = job.Size(1, 512, 0)
    assert job.env_request({**jv, "TT_COLD": "1"}, "debian-12", size).cold
    assert job.env_request({**jv, "TT_COLD": "true"}, "debian-12", size).to_dict()["cold"]
    assert not job.env_request(jv, "debian-12", size).cold
    assert "cold" not in job.env_request(jv, "debian-12", size).to_dict()


def test_a_host_with_warm_start_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built_image("debian-12", "amd64")
    monkeypatch.setenv("TT_HOSTD_WARM", "false")  # tt-hostd serve --no-warm
    with small_cloud(tmp_path, mem_total=2048):
        cfg = tmp_path / "client.json"
        _add(cfg, "nowarm")
        row = _vm(tmp_path, "nowarm")
        assert row["start"] == "cold" and "off on this host" in row["warm_why"], row
        warm = _image_start(cfg)
        assert warm["start"] == "cold" and "warm start is off on the host" in warm["why"], warm
        time.sleep(2)
        assert _hostd_rows(tmp_path, "templates") == []  # none made in the background either
        assert tt("env", "del", "nowarm", config=cfg).returncode == 0
