"""The admission queue for real: `tt up`'s hostd and scheduler with room for two 1-CPU VMs, real
VMs, and more ENV requests than fit. Everything waits its turn and completes; a cancelled or
timed-out request leaves nothing; a restarted scheduler keeps the queue and its order.

The stack is started here (not with `running`) so the scheduler can be restarted alone with the
same tokens while hostd and its VMs stay up.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cloudutil import configure_client, free_port, leftovers, tt
from tests.conftest import IMAGE_PATH, built_image
from ttci.cli.allinone import STOP_GRACE_S, _hostd_argv, _spawn, python_main
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.proc import BASE_ENV, stop
from ttci.model.errors import ApiError
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest
from ttci.wire.queue import QueueInfo, WaitOptions

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
IMAGE = "qemu:debian-12:amd64"
MEM = 384


@dataclass
class Cloud:
    state: Path
    scheduler: str
    token: str
    env: dict[str, str]
    hostd_listen: str
    sched_proc: subprocess.Popen[bytes] | None = None
    cfg: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = self.state / "client.json"

    def start_scheduler(self) -> None:
        argv = [
            *python_main("ttci.scheduler.web.serve"),
            *("--listen", self.scheduler, "--server-set", f"local={self.hostd_listen}"),
            *("--state-dir", str(self.state)),
        ]
        self.sched_proc = _spawn(argv, self.env, self.state / "scheduler.log", "tt-scheduler")

    def stop_scheduler(self) -> None:
        if self.sched_proc is not None:
            stop(self.sched_proc, grace=STOP_GRACE_S)
            self.sched_proc = None

    def client(self) -> Client:
        return Client(ClientConfig(self.scheduler, self.token))

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(
            method,
            f"http://{self.scheduler}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=kw.pop("timeout", 60),
            **kw,
        )

    def envs(self) -> dict[str, str]:
        return {e["name"]: e["state"] for e in self.client().get("/v1/envs")}

    def queue(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.client().get("/v1/queue")
        return out


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """Room for two 1-CPU VMs (--cpu-total 2)."""
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("queue-cloud")
    env = {
        **BASE_ENV,
        "TT_HOSTD_TOKEN": secrets.token_urlsafe(24),
        "TT_ADMIN_TOKEN": secrets.token_urlsafe(24),
    }
    hostd_listen = f"127.0.0.1:{free_port()}"
    argv = _hostd_argv(
        state,
        IMAGE_PATH,
        hostd_listen=hostd_listen,
        libvirt_uri=None,
        cpu_total=2,
        mem_total=2048,
        allow_outgoing=False,
    )
    hostd = _spawn(argv, env, state / "hostd.log", "tt-hostd")
    c = Cloud(state, f"127.0.0.1:{free_port()}", env["TT_ADMIN_TOKEN"], env, hostd_listen)
    try:
        c.start_scheduler()
        configure_client(c.scheduler, c.token, c.cfg)
        yield c
    finally:
        c.stop_scheduler()
        stop(hostd, grace=STOP_GRACE_S)
    assert _our_leftovers(state) == []


def _our_leftovers(state: Path) -> list[str]:
    """leftovers(), but of the VM cgroups (which are machine-wide) only those of this cloud's
    own VMs and templates, whose ids its hostd logged: other engineers' clouds may run now."""
    log = (state / "hostd.log").read_text(errors="replace")

    def ours(item: str) -> bool:
        m = re.search(r"-tt-[a-z0-9]+-(?:tpl-)?([0-9a-f]{8,})", item)
        return not item.startswith("cgroup ") or (m is not None and m[1] in log)

    return [x for x in leftovers(state) if ours(x)]


def _req(name: str, vms: int = 1) -> EnvRequest:
    return EnvRequest(name, IMAGE, memory_mib=MEM, dup_each=vms, life_s=900)


@contextlib.contextmanager
def _full(c: Cloud, name: str) -> Iterator[None]:
    """The whole cloud taken by one 2-VM ENV until the block ends."""
    c.client().create_env(_req(name, vms=2))
    try:
        yield
    finally:
        c.client().delete_env_wait(name)


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _nothing_left(c: Cloud) -> None:
    assert c.envs() == {} and c.queue() == []
    r = tt("env", "list", "--json", config=c.cfg)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout + r.stderr
    vms = requests.get(
        f"http://{c.hostd_listen}/v1/vms",
        headers={"Authorization": f"Bearer {c.env['TT_HOSTD_TOKEN']}"},
        timeout=30,
    ).json()
    assert vms == []


@dataclass
class Job:
    name: str
    vms: int
    positions: list[int] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)
    granted_at: float = 0.0
    error: str = ""


def _job(c: Cloud, job: Job, delay: float) -> None:
    """A CI job: wait in the queue, run a command on every VM, delete the ENV."""
    client = c.client()

    def queued(q: QueueInfo) -> None:
        job.positions.append(q.position)
        job.reasons.add(q.blocked_by)

    def granted(waited: float) -> None:
        job.granted_at = time.monotonic()

    time.sleep(delay)
    try:
        client.create_env_progress(
            _req(job.name, job.vms), lambda vm: None, on_queued=queued, on_granted=granted
        )
        job.granted_at = job.granted_at or time.monotonic()
        codes = [
            ev.status.code
            for ev in client.exec(job.name, ExecRequest.shell("sleep 1; echo ok"))
            if ev.kind is EventKind.EXIT and ev.status is not None
        ]
        assert codes == [0] * job.vms, codes
    except Exception as e:  # reported by the test, which sees every job
        job.error = repr(e)
    finally:
        client.delete_env_wait(job.name)


def test_more_requests_than_capacity_all_complete_in_order(cloud: Cloud) -> None:
    """Five requests at once, one of them of two VMs (the whole cloud, all or nothing): the
    first two start, the rest wait and are told their place; nobody fails, and the big one is
    not overtaken by the small ones behind it (room is held for it)."""
    jobs = [Job("burst-a", 1), Job("burst-b", 1), Job("burst-c", 2), Job("burst-d", 1)]
    jobs.append(Job("burst-e", 1))
    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(_job, cloud, j, 0.2 * i) for i, j in enumerate(jobs)]:
            f.result()
    assert [j.error for j in jobs] == [""] * len(jobs)
    assert not jobs[0].positions and not jobs[1].positions  # room for both at once
    assert [j.positions[0] for j in jobs[2:]] == [1, 2, 3]  # told their place at once
    for j in jobs[2:]:  # and it only ever moved forward (one user: nobody overtakes)
        assert j.positions == sorted(j.positions, reverse=True), (j.name, j.positions)
        assert j.reasons == {"capacity"}
    # One user: first come, first served (d and e are granted in one go when c ends).
    order = [j.name for j in sorted(jobs, key=lambda j: j.granted_at)]
    assert set(order[:2]) == {"burst-a", "burst-b"} and order[2] == "burst-c", order
    assert set(order[3:]) == {"burst-d", "burst-e"}
    _nothing_left(cloud)


def test_a_cancelled_queued_request_leaves_nothing(cloud: Cloud) -> None:
    with _full(cloud, "hold-cancel"):
        told = threading.Event()
        errors: list[Exception] = []

        def wait_in_line() -> None:
            try:
                cloud.client().create_env_progress(
                    _req("cancel-me"), lambda vm: None, on_queued=lambda q: told.set()
                )
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=wait_in_line)
        t.start()
        assert told.wait(30)
        assert cloud.envs()["cancel-me"] == "queued"
        assert cloud.client().delete_env("cancel-me").get("was") == "queued"
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ApiError), errors
        assert "cancelled while queued" in errors[0].message

        # A client that goes away (Ctrl-C, a cancelled CI job) takes its request out too.
        r = cloud.api("POST", "/v1/envs?progress=1", json=_req("walk-away").to_dict(), stream=True)
        first = json.loads(next(r.iter_lines()))
        assert first["event"] == "queued" and first["position"] == 1
        r.close()
        _wait_for(lambda: "walk-away" not in cloud.envs(), "the abandoned request to go")
        assert cloud.queue() == [] and set(cloud.envs()) == {"hold-cancel"}
    _nothing_left(cloud)


def test_max_wait_and_no_wait_end_with_nothing_left(cloud: Cloud) -> None:
    with _full(cloud, "hold-wait"):
        t0 = time.monotonic()
        with pytest.raises(ApiError) as e:
            cloud.client().create_env(_req("impatient"), wait=WaitOptions(max_wait_s=2))
        assert e.value.status == 408 and "max_wait" in e.value.message
        assert 2 <= time.monotonic() - t0 < 10
        # The plain (not streamed) request answers 408 too.
        r = cloud.api("POST", "/v1/envs", json={**_req("plain").to_dict(), "max_wait": "1s"})
        assert r.status_code == 408, r.text
        # wait: false keeps the old fail-fast answer.
        with pytest.raises(ApiError) as e:
            cloud.client().create_env(_req("hasty"), wait=WaitOptions(wait=False))
        assert e.value.status == 409
        assert set(cloud.envs()) == {"hold-wait"} and cloud.queue() == []
    _nothing_left(cloud)


def _stream_until_queued(c: Cloud, name: str) -> requests.Response:
    r = c.api("POST", "/v1/envs?progress=1", json=_req(name).to_dict(), stream=True)
    assert r.status_code == 201, r.text
    first = json.loads(next(r.iter_lines()))
    assert first["event"] == "queued", first
    return r


def _follow(c: Cloud, name: str) -> dict[str, Any]:
    """Re-attach to a request of the scheduler before its restart, until it is ready."""
    with c.api("GET", f"/v1/envs/{name}/progress", stream=True, timeout=300) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[-1]["event"] == "ready", events
    last: dict[str, Any] = events[-1]
    return last


def test_scheduler_restart_keeps_the_queue_and_its_order(cloud: Cloud) -> None:
    names = ["restart-a", "restart-b", "restart-c"]
    cloud.client().create_env(_req("hold-restart", vms=2))
    streams = []
    for n in names:
        streams.append(_stream_until_queued(cloud, n))
        time.sleep(0.05)
    assert [q["env"] for q in cloud.queue()] == names

    cloud.stop_scheduler()  # the clients' streams break; their requests must stay
    for r in streams:
        r.close()
    cloud.start_scheduler()
    _wait_for(lambda: len(cloud.queue()) == 3, "the restarted scheduler to decide")
    queue = cloud.queue()
    assert [(q["env"], q["position"]) for q in queue] == list(zip(names, [1, 2, 3], strict=True))
    assert {q["blocked_by"] for q in queue} == {"capacity"}
    assert all(q["waited_s"] > 0 for q in queue)
    assert cloud.envs() == {"hold-restart": "ready", **dict.fromkeys(names, "queued")}

    cloud.client().delete_env("hold-restart")  # room for two: the first two in line go
    for n in names[:2]:
        assert _follow(cloud, n)["env"]["state"] == "ready"
    assert [(q["env"], q["position"]) for q in cloud.queue()] == [("restart-c", 1)]
    cloud.client().delete_env("restart-a")
    _follow(cloud, "restart-c")
    for n in names[1:]:
        cloud.client().delete_env(n)
    _nothing_left(cloud)
