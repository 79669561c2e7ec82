"""Prometheus output of the scheduler (read from a real state database) and of hostd's counters,
parsed with prometheus_client's own parser. The live test (real VMs starting and stopping) is
in test_admin_browser.py, which shares its cloud."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hostd.service.metrics import HostMetrics
from tests.admin_fake import HOST_TOKEN, fake_scheduler, queue_requests
from ttci import __version__
from ttci.scheduler.metrics import WAIT_BUCKETS, scheduler_registry
from ttci.scheduler.web.api import create_app
from ttci.wire.commands import ExecEvent

ADMIN = "admin-secret-" + "m" * 24
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(m: Samples, metric: str, /, **labels: str) -> float:
    return m[(metric, tuple(sorted(labels.items())))]


@pytest.fixture
def text(tmp_path: Path, database: str) -> Iterator[str]:
    s = fake_scheduler(tmp_path, ADMIN, vms=1000, per_env=4, hosts=4, jobs=200, database=database)
    with s.store.lock:
        s.store.db.execute("update vms set state = 'lost' where env = 'ci-00000'")
    yield create_app(s).test_client().get("/metrics").text  # open: no token needed
    s.close()


def test_scheduler_metrics_count_vms_envs_hosts_and_jobs(text: str) -> None:
    m = _parse(text)
    assert _v(m, "ttci_vms", state="running") == 996
    assert _v(m, "ttci_vms", state="lost") == 4
    assert _v(m, "ttci_vms", state="failed") == 0
    assert _v(m, "ttci_envs", state="ready") == 250
    assert _v(m, "ttci_host_up", host="fake-3") == 1
    assert _v(m, "ttci_host_capacity_cpus", host="fake-0") == 64
    assert _v(m, "ttci_host_used_memory_bytes", host="fake-0") == 128000 * 2**20
    assert _v(m, "ttci_build_info", program="tt-scheduler", version=__version__) == 1
    for kind in ("gitlab", "github", "jenkins", "cli"):
        assert _v(m, "ttci_jobs_started_total", kind=kind) == 50
    results = {k[1]: v for k, v in m.items() if k[0] == "ttci_job_results_total"}
    assert sum(results.values()) == 200
    assert _v(m, "ttci_job_results_total", kind="gitlab", result="success") == 50


def test_job_start_histogram_is_cumulative(text: str) -> None:
    m = _parse(text)
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in m.items()
        if k[0] == "ttci_job_start_seconds_bucket" and dict(k[1])["kind"] == "github"
    )
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == 50
    assert _v(m, "ttci_job_start_seconds_count", kind="github") == 50
    assert dict(buckets)[5.0] < 50 <= dict(buckets)[20.0]  # fake latencies are 5..11 s


def test_metrics_hold_no_secret_and_no_names(text: str) -> None:
    assert ADMIN not in text and HOST_TOKEN not in text
    assert "ci-00000" not in text  # ENV names would make unbounded label sets


def test_scheduler_registry_on_an_empty_state(tmp_path: Path) -> None:
    s = fake_scheduler(tmp_path, ADMIN, vms=0, hosts=0, jobs=0)
    m = _parse(generate_latest(scheduler_registry(s.store)).decode())
    assert _v(m, "ttci_vms", state="running") == 0
    assert _v(m, "ttci_envs", state="queued") == 0
    assert not [k for k in m if k[0].startswith("ttci_jobs_started")]
    assert not [k for k in m if k[0].startswith("ttci_queue_wait_seconds")]
    # Every origin kind and reason is there, at 0, so dashboards and alerts need no absent().
    assert _v(m, "ttci_queue_requests", kind="github", reason="quota") == 0
    assert _v(m, "ttci_queue_oldest_wait_seconds", kind="gitlab") == 0
    assert not [k for k in m if k[0].startswith("ttci_quota_")]
    s.stop()


@pytest.fixture
def queued(tmp_path: Path) -> Iterator[str]:
    """Metrics of a cloud with 40 running VMs (user admin), three waiting requests and quotas."""
    s = fake_scheduler(tmp_path, ADMIN, vms=40, per_env=2, hosts=2, jobs=200)
    queue_requests(s)  # bob's big one waits for capacity, alice's two for her quota
    from ttci.scheduler import admission_store
    from ttci.scheduler.planning.admission import Quota

    admission_store.set_quota(s.store, "project", "gitlab:g/p", Quota(vms=4, cpus=2.5))
    with s.store.lock:  # one request is older, as after a long wait
        s.store.db.execute(
            "update queue set enqueued_at = enqueued_at - 300, request = json_set(request,"
            " '$.enqueued_at', json_extract(request, '$.enqueued_at') - 300) where env = 'q1'"
        )
    yield create_app(s).test_client().get("/metrics").text
    s.stop()


def test_queue_depth_by_kind_and_reason(queued: str) -> None:
    m = _parse(queued)
    assert _v(m, "ttci_envs", state="queued") == 3
    assert _v(m, "ttci_queue_requests", kind="gitlab", reason="capacity") == 1
    assert _v(m, "ttci_queue_requests", kind="github", reason="quota") == 1
    assert _v(m, "ttci_queue_requests", kind="cli", reason="quota") == 1
    depth = {k[1]: v for k, v in m.items() if k[0] == "ttci_queue_requests"}
    assert sum(depth.values()) == 3 and len(depth) == 5 * 4  # every kind x reason
    assert 300 <= _v(m, "ttci_queue_oldest_wait_seconds", kind="github") < 330
    assert 0 <= _v(m, "ttci_queue_oldest_wait_seconds", kind="gitlab") < 30
    assert _v(m, "ttci_queue_oldest_wait_seconds", kind="jenkins") == 0
    assert "q1" not in queued and "big" not in queued  # no ENV names


def test_queue_requests_not_yet_decided(tmp_path: Path) -> None:
    """Without the scheduler's last decision (e.g. just after a restart), waiting requests are
    counted as undecided."""
    s = fake_scheduler(tmp_path, ADMIN, vms=40, per_env=2, hosts=2, jobs=0)
    queue_requests(s)
    m = _parse(generate_latest(scheduler_registry(s.store)).decode())
    assert _v(m, "ttci_queue_requests", kind="cli", reason="undecided") == 1
    assert _v(m, "ttci_queue_requests", kind="github", reason="undecided") == 1
    s.stop()


def test_quota_use_and_caps_per_user_and_project(queued: str) -> None:
    m = _parse(queued)
    # The 40 fake VMs are user admin's (no project recorded: the user's own key).
    assert _v(m, "ttci_quota_used_vms", scope="user", name="admin") == 40
    assert _v(m, "ttci_quota_used_cpus", scope="user", name="admin") == 40
    assert _v(m, "ttci_quota_used_vms", scope="project", name="user:admin") == 40
    assert ("ttci_quota_limit_vms", (("name", "admin"), ("scope", "user"))) not in m  # no cap
    assert _v(m, "ttci_quota_used_vms", scope="user", name="alice") == 0
    assert _v(m, "ttci_quota_limit_vms", scope="user", name="alice") == 0
    assert ("ttci_quota_limit_cpus", (("name", "alice"), ("scope", "user"))) not in m
    assert _v(m, "ttci_quota_limit_vms", scope="project", name="gitlab:g/p") == 4
    assert _v(m, "ttci_quota_limit_cpus", scope="project", name="gitlab:g/p") == 2.5
    assert _v(m, "ttci_quota_used_cpus", scope="project", name="gitlab:g/p") == 0


def test_wait_histogram_from_the_job_history(queued: str) -> None:
    m = _parse(queued)
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in m.items()
        if k[0] == "ttci_queue_wait_seconds_bucket" and dict(k[1])["kind"] == "gitlab"
    )
    assert [b for b, _ in buckets] == [*WAIT_BUCKETS, float("inf")]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == 50
    # Fake waits are 0, 30, 60, 90, 120 s in turn; gitlab's jobs are every 4th (j = 0, 4, 8 ...).
    assert dict(buckets)[0.5] == 10 and dict(buckets)[30.0] == 20 and dict(buckets)[120.0] == 50
    assert _v(m, "ttci_queue_wait_seconds_sum", kind="gitlab") == 10 * (0 + 30 + 60 + 90 + 120)
    assert _v(m, "ttci_queue_wait_seconds_count", kind="gitlab") == 50


def _events(*evs: dict[str, Any]) -> Iterator[ExecEvent]:
    """A command's stream as hostd yields it, ending with evs (given as on the wire)."""
    yield ExecEvent.start()
    yield ExecEvent.output("stdout", b"")
    yield from map(ExecEvent.from_dict, evs)


def test_hostd_counts_boots_and_commands_by_outcome() -> None:
    hm = HostMetrics(
        lambda: {
            "vms": {"running": 2, "lost": 1},
            "total": {"cpus": 8, "memory_mib": 8192, "disk_gib": 100},
            "used": {"cpus": 2, "memory_mib": 1536, "disk_gib": 8},
        }
    )
    assert hm.count_boot(lambda: {"boot_s": 4.5})["boot_s"] == 4.5

    def broken() -> dict[str, Any]:
        raise RuntimeError("no image")

    with pytest.raises(RuntimeError):
        hm.count_boot(broken)
    list(hm.timed_exec(_events({"event": "exit", "code": 0})))
    list(hm.timed_exec(_events({"event": "exit", "code": 2})))
    list(hm.timed_exec(_events({"event": "exit", "code": None, "timed_out": True})))
    list(hm.timed_exec(_events({"event": "exit", "code": None, "signal": 9})))
    list(hm.timed_exec(_events({"event": "error", "message": "VM lost", "lost": True})))
    abandoned = hm.timed_exec(_events({"event": "exit", "code": 0}))
    next(abandoned)
    abandoned.close()  # the client went away mid-stream
    m = _parse(hm.exposition().decode())
    assert _v(m, "ttci_hostd_vm_boots_total", result="ok") == 1
    assert _v(m, "ttci_hostd_vm_boots_total", result="failed") == 1
    assert _v(m, "ttci_hostd_vm_boot_seconds_sum") == 4.5
    for outcome in ("ok", "failed", "timed_out", "killed", "error", "cancelled"):
        assert _v(m, "ttci_hostd_execs_total", outcome=outcome) == 1, outcome
    assert _v(m, "ttci_hostd_exec_seconds_count") == 6
    assert _v(m, "ttci_hostd_vms", state="running") == 2
    assert _v(m, "ttci_hostd_vms", state="creating") == 0
    assert _v(m, "ttci_hostd_used_memory_bytes") == 1536 * 2**20
    assert _v(m, "ttci_hostd_capacity_disk_bytes") == 100 * 2**30
    assert _v(m, "ttci_build_info", program="tt-hostd", version=__version__) == 1


def test_one_unit_per_metric(text: str) -> None:
    """No metric mixes units under a label: resources are _cpus, _memory_bytes, _disk_bytes."""
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert "ttci_host_capacity" not in names and "ttci_host_used" not in names
    for what in ("capacity", "used"):
        assert {f"ttci_host_{what}_{u}" for u in ("cpus", "memory_bytes", "disk_bytes")} <= names
    for fam in text_string_to_metric_families(text):
        assert all("resource" not in s.labels for s in fam.samples), fam.name
