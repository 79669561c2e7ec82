"""The admin page in a real headless Chromium (Debian's), against `tt up`'s stack with a real
host and real VMs; and the scheduler's and hostd's /metrics moving as VMs start and stop.

Screenshots go to test-artifacts/admin/ (gitignored) for people to look at. The README's picture
of the page, docs/admin.png, is taken by test_the_readme_screenshot from a busy pool (fake hosts
and rows in a real scheduler state, no VM booted: tests/admin_fake.py); it is written there only
when TT_DOCS_SCREENSHOT=1 is set, so a test run never changes a committed file by itself:

    TT_DOCS_SCREENSHOT=1 .venv/bin/pytest tests/test_admin_browser.py -k readme_screenshot
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import waitress
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_fake import fake_scheduler, queue_requests
from tests.cloudutil import free_port, leftovers, small_cloud
from tests.conftest import built_image
from ttci.cli.allinone import Stack
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.scheduler.web.api import create_app
from ttci.wire.commands import ExecRequest, ExitStatus
from ttci.wire.envs import EnvRequest
from ttci.wire.jobs import JobResult

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "admin"
DOCS_SHOT = ROOT / "docs" / "admin.png"  # the README's picture (TT_DOCS_SCREENSHOT=1 writes it)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _leftovers(state: Path) -> list[str]:
    """leftovers() in a thread of its own: pyroute2 cannot run inside Playwright's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(leftovers, state).result()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Client]]:
    built_image("debian-12", "amd64")
    with small_cloud(tmp_path_factory.mktemp("admin-cloud")) as stack:
        yield stack, Client(config.ClientConfig(stack.scheduler, stack.token))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shot(page: Any, name: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for d in (ARTIFACTS, tmp_path):
        page.screenshot(path=str(d / f"{name}.png"), full_page=True)


# One operator session from login to logout, step by step as a person goes.
@pytest.mark.vm
@pytest.mark.e2e
def test_operator_logs_in_sees_the_cloud_and_deletes_an_env(  # noqa: PLR0915
    cloud: tuple[Stack, Client], browser: Any, tmp_path: Path
) -> None:
    stack, client = cloud
    base = f"http://{stack.scheduler}/admin/"
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())  # the "Delete ENV ...?" confirmation

    page.goto(base)
    assert page.url.endswith("/admin/login")
    page.fill("#token", "not-the-token")
    page.click("#login")
    assert "wrong or missing token" in page.inner_text("#login-error")
    page.fill("#token", stack.token)
    page.click("#login")
    host = page.wait_for_selector('#hosts tr[data-host="local"]')
    assert host is not None and "up" in host.inner_text() and "tcg" in host.inner_text()
    _shot(page, "1-logged-in", tmp_path)

    # A GitLab job's ENV appears while it boots, with a link back to the job.
    job_url = "https://gitlab.example.org/group/app/-/jobs/4242"
    made: list[dict[str, Any]] = []
    creating = threading.Thread(
        target=lambda: made.append(
            client.create_env(
                EnvRequest(
                    "web-1",
                    "debian-12:amd64",
                    memory_mib=384,
                    origin={"kind": "gitlab", "job": "4242", "url": job_url, "project": "app"},
                )
            )
        )
    )
    creating.start()
    row = page.wait_for_selector('#envs .env[data-env="web-1"]', timeout=30_000)
    assert row is not None
    link = page.wait_for_selector('#envs .env[data-env="web-1"] a')
    assert link is not None and link.get_attribute("href") == job_url
    assert "gitlab: app job 4242" in link.inner_text()
    creating.join(120)
    assert made and made[0]["state"] == "ready"
    page.wait_for_selector('#envs .vm[data-vm="web-1/debian-12-amd64"] >> text=running')
    page.wait_for_selector('#jobs tr[data-job="web-1"]')
    _shot(page, "2-env-running", tmp_path)

    # Forged requests change nothing: no session at all, or the session without the CSRF token.
    r = requests.post(f"{base}api/envs/web-1/delete", timeout=10)
    assert r.status_code in (400, 401)
    r = page.request.post(f"{base}api/envs/web-1/delete", data="{}")
    assert r.status == 400 and "refused" in r.json()["error"]
    assert client.show_env("web-1")["state"] == "ready"

    # Drain and undrain the host from the page.
    page.click('#hosts tr[data-host="local"] button[data-action="drain"]')
    page.wait_for_selector('#hosts tr[data-host="local"] >> text=drained')
    assert client.get("/v1/hosts")[0]["drained"] is True
    page.click('#hosts tr[data-host="local"] button[data-action="undrain"]')
    page.wait_for_selector('#hosts tr[data-host="local"] button[data-action="drain"]')
    assert client.get("/v1/hosts")[0]["drained"] is False

    # One more hour on top of what is left.
    before = client.show_env("web-1")["expires_at"]
    page.click('#envs .env[data-env="web-1"] button[data-action="extend"]')
    page.wait_for_selector("#message >> text=extending ENV web-1 by 1 h: done")
    assert client.show_env("web-1")["expires_at"] > before

    # Delete it from the page; it vanishes without a reload, and from the cloud.
    page.click('#envs .env[data-env="web-1"] button[data-action="delete"]')
    page.wait_for_selector('#envs .env[data-env="web-1"]', state="detached", timeout=60_000)
    assert "deleting ENV web-1: done" in page.inner_text("#message")
    assert [e["name"] for e in client.get("/v1/envs")] == []
    assert _leftovers(stack.state_dir) == []
    _shot(page, "3-env-deleted", tmp_path)

    # Acting on what is gone says so.
    page.evaluate(
        """async () => {
            const t = document.querySelector('meta[name="csrf-token"]').content;
            await fetch('api/envs/web-1/delete', {method: 'POST', headers: {'X-CSRFToken': t}})
              .then(r => r.json()).then(j => { window.lastError = j.error; });
        }"""
    )
    assert page.evaluate("window.lastError") == "no ENV named 'web-1'"
    assert errors == []
    page.close()


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.vm
@pytest.mark.e2e
def test_metrics_parse_and_move_when_vms_start_and_stop(cloud: tuple[Stack, Client]) -> None:
    stack, client = cloud
    sched_url, hostd_url = f"http://{stack.scheduler}/metrics", f"http://{stack.hostd}/metrics"

    def both() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {**_metrics(sched_url), **_metrics(hostd_url)}

    def v(m: dict[Any, float], name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    m0 = both()
    client.create_env(EnvRequest("metrics-1", "debian-12:amd64", memory_mib=384))
    events = list(client.exec("metrics-1", ExecRequest.shell("exit 3")))
    assert events[-1].status == ExitStatus(3)
    m1 = both()
    client.report_result("metrics-1", JobResult("failed"))
    client.delete_env("metrics-1")
    m2 = both()

    assert v(m1, "ttci_vms", state="running") == v(m0, "ttci_vms", state="running") + 1
    assert v(m2, "ttci_vms", state="running") == v(m0, "ttci_vms", state="running")
    assert v(m1, "ttci_hostd_vms", state="running") == v(m0, "ttci_hostd_vms", state="running") + 1
    assert v(m2, "ttci_hostd_vms", state="running") == v(m0, "ttci_hostd_vms", state="running")
    assert v(m1, "ttci_hostd_used_memory_bytes") > v(m0, "ttci_hostd_used_memory_bytes")
    assert v(m1, "ttci_hostd_capacity_cpus") == 4
    assert v(m1, "ttci_hostd_vm_boots_total", result="ok") == (
        v(m0, "ttci_hostd_vm_boots_total", result="ok") + 1
    )
    assert (
        v(m1, "ttci_hostd_vm_boot_seconds_count") == v(m0, "ttci_hostd_vm_boot_seconds_count") + 1
    )
    assert v(m1, "ttci_hostd_execs_total", outcome="failed") == (
        v(m0, "ttci_hostd_execs_total", outcome="failed") + 1
    )
    assert v(m1, "ttci_hostd_exec_seconds_sum") > v(m0, "ttci_hostd_exec_seconds_sum")
    assert v(m1, "ttci_jobs_started_total", kind="cli") == (
        v(m0, "ttci_jobs_started_total", kind="cli") + 1
    )
    assert v(m1, "ttci_job_start_seconds_count", kind="cli") == (
        v(m0, "ttci_job_start_seconds_count", kind="cli") + 1
    )
    assert v(m2, "ttci_job_results_total", kind="cli", result="failed") == (
        v(m0, "ttci_job_results_total", kind="cli", result="failed") + 1
    )
    assert v(m1, "ttci_host_up", host="local") == 1


@pytest.mark.e2e
def test_the_readme_screenshot(browser: Any, tmp_path: Path) -> None:
    """The page of a busy pool as an operator sees it: hosts, ENVs from every CI, the queue,
    recent jobs and the plots (3 fake hosts, 8 ENVs of 3 VMs, 3 waiting requests, 120 jobs)."""
    admin = "readme-admin-token-" + "r" * 20
    sched = fake_scheduler(tmp_path / "state", admin, 24, per_env=3, hosts=3, jobs=120)
    queue_requests(sched)
    port = free_port()
    server = waitress.create_server(create_app(sched), host="127.0.0.1", port=port, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/admin/login")
        page.fill("#token", admin)
        page.click("#login")
        page.wait_for_selector('#hosts tr[data-host="fake-2"]')
        page.wait_for_selector('#envs .env[data-env="ci-00007"]')
        page.wait_for_selector("#jobs tr[data-job]")
        page.wait_for_selector("svg")
        assert errors == []
        _shot(page, "readme", tmp_path)
        if os.environ.get("TT_DOCS_SCREENSHOT") == "1":
            page.screenshot(path=str(DOCS_SHOT), full_page=False)  # the first screen only
        page.close()
    finally:
        server.close()
        sched.stop()
    assert DOCS_SHOT.is_file(), "run once with TT_DOCS_SCREENSHOT=1 to make docs/admin.png"
