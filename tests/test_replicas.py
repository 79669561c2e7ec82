"""Three scheduler replicas on one PostgreSQL, for real: a real hostd joins all three (--join
A,B,C) with room for two 1-CPU VMs, a burst of ENV requests is spread over the replicas (each
client lists them all, its own replica first), and the replica holding the background loops'
lease (any replica before leases exist) is SIGKILLed in the middle, while a `run` streams
through it. Every request ends exactly once (created and used, or refused with a reason), no VM
is ever placed twice (hostd's own VM list, sampled throughout), nothing is lost or leaked, and
the `run` on the killed replica fails saying so and succeeds when run again."""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cloudutil import free_port, leftovers
from tests.conftest import built_image
from tests.github.payloads import deliver, job_event
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys, serve_argv
from tests.pgcluster import PgCluster
from tests.replicautil import (
    ADMIN,
    HostdProc,
    SchedulerProc,
    own_cache,
    start_hostd,
    start_scheduler,
)
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.proc import BASE_ENV, stop
from ttci.model.errors import ApiError, TTError
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest
from ttci.wire.queue import WaitOptions

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
IMAGE = "qemu:debian-12:amd64"
BURST = 5
CAPACITY = 2  # 1-CPU VMs the host has room for
TRAIL: dict[str, list[str]] = {f"r-burst{i}": [] for i in range(BURST)}  # retries, for failures


@dataclass
class Fleet:
    replicas: list[SchedulerProc]
    hostd: HostdProc

    def client(self, first: int = 0, *, only: bool = False) -> Client:
        """A client listing every replica, starting at replicas[first] (or only that one)."""
        n = len(self.replicas)
        order = [self.replicas[(first + i) % n] for i in range(1 if only else n)]
        return Client(ClientConfig(",".join(r.addr for r in order), ADMIN))

    def alive(self) -> list[SchedulerProc]:
        return [r for r in self.replicas if r.proc.poll() is None]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster) -> Iterator[Fleet]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("replicas")
    with contextlib.ExitStack() as stack:
        stack.enter_context(own_cache(state / "cache"))
        url = stack.enter_context(pg.database())
        replicas = []
        for i in (1, 2, 3):
            s = start_scheduler(state / f"s{i}", "--database", url, "--host-timeout", "10")
            stack.callback(s.stop)
            replicas.append(s)
        hostd = start_hostd(state / "host", ",".join(r.addr for r in replicas), cpu_total=2)
        stack.callback(stop, hostd.proc, grace=30)
        f = Fleet(replicas, hostd)
        deadline = time.monotonic() + 60
        while not any(h["state"] == "up" for h in f.client().get("/v1/hosts")):
            assert time.monotonic() < deadline, "the host did not join"
            time.sleep(0.5)
        yield f
    assert leftovers(state / "host") == []


def leases_of(r: SchedulerProc) -> str | None:
    """What a replica's /readyz says of the background loops' leases ("dispatch: this
    replica; reaper: HOST:PID:..."); None before the scheduler had leases."""
    with contextlib.suppress(requests.RequestException, ValueError, KeyError):
        got = requests.get(r.url + "/readyz", timeout=5).json()
        return str(got["checks"]["leases"].get("detail", ""))
    return None


def lease_holder(f: Fleet) -> int | None:
    """The index of the replica that holds the background loops' leases; None while the
    scheduler has no leases (every replica then runs them)."""
    for r in f.alive():
        detail = leases_of(r)
        for i, rr in enumerate(f.replicas):
            if detail and (f":{rr.proc.pid}:" in detail or (rr is r and "this replica" in detail)):
                return i
    return None


def takeover_s(f: Fleet, victim: SchedulerProc, since: float, timeout: float = 30) -> float:
    """Seconds from `since` until a live replica holds every lease the victim held."""
    while time.monotonic() - since < timeout:
        for r in f.alive():
            detail = leases_of(r) or ""
            if "this replica" in detail and f":{victim.proc.pid}:" not in detail:
                return time.monotonic() - since
        time.sleep(0.1)
    raise AssertionError(f"no replica took the leases over in {timeout} s")


@dataclass
class Sampler:
    """Samples hostd's VM list until stopped: the most VMs at once, and any VM (ENV, name)
    present twice at the same moment (placed twice)."""

    hostd: HostdProc
    most: int = 0
    twice: list[tuple[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.3):
            with contextlib.suppress(requests.RequestException):
                vms = [v for v in self.hostd.vms() if str(v.get("env", "")).startswith("r-")]
                keys = Counter((str(v["env"]), str(v["name"])) for v in vms)
                self.most = max(self.most, len(vms))
                self.twice += [k for k, n in keys.items() if n > 1]
                self.seen.update(str(v["env"]) for v in vms)


def one_request(f: Fleet, i: int, out: dict[str, list[str]]) -> None:
    """What a CI job does: ask for an ENV (through its replica first), use it, delete it. A
    request that may have been carried out (its connection broke) is cleaned up and asked
    again, as CI retries; each request's outcomes are recorded (a failed check too)."""
    try:
        _one_request(f, i, out)
    except Exception as e:  # recorded: the test fails on it with the others' outcomes
        out[f"r-burst{i}"].append(f"failed: {type(e).__name__}: {e}")


def _one_request(f: Fleet, i: int, out: dict[str, list[str]]) -> None:
    name = f"r-burst{i}"
    c = f.client(i % len(f.replicas))
    req = EnvRequest(name, IMAGE, memory_mib=384, life_s=600)
    for _attempt in range(3):
        try:
            env = c.create_env(req, wait=WaitOptions(max_wait_s=400))
        except ApiError as e:
            out[name].append(f"refused: {e.message}")
            return
        except TTError as e:
            if "may have been carried out" not in (e.hint or ""):
                out[name].append(f"error: {e.message}")
                return
            TRAIL[name].append(f"broke: {e.message}; deleted: {c.delete_env_wait(name)}")
            continue
        on_host = [v for v in f.hostd.vms() if v.get("env") == name]
        assert sorted(str(v["name"]) for v in on_host) == [v["name"] for v in env["vms"]]
        said = b"".join(ev.data for ev in c.exec(name, ExecRequest(("echo", name))))
        assert said == f"{name}\n".encode()
        assert c.delete_env_wait(name)
        out[name].append("created")
        return
    out[name].append("gave up")


def test_a_burst_over_three_replicas_survives_killing_the_lease_holder(fleet: Fleet) -> None:
    holder = lease_holder(fleet)
    victim = 0 if holder is None else holder
    via_victim = fleet.client(victim, only=True)
    anywhere = fleet.client(victim)  # the victim first: it must fail over
    anywhere.create_env(EnvRequest("r-long", IMAGE, memory_mib=384, life_s=600))
    sampler = Sampler(fleet.hostd)
    threading.Thread(target=sampler.run, daemon=True).start()
    long_run = via_victim.exec("r-long", ExecRequest.shell("echo started; sleep 120; echo late"))
    first = next(ev for ev in long_run if ev.kind is not EventKind.START)
    assert first.kind is EventKind.STDOUT and first.data == b"started\n"

    outcomes: dict[str, list[str]] = {f"r-burst{i}": [] for i in range(BURST)}
    threads = [
        threading.Thread(target=one_request, args=(fleet, i, outcomes), daemon=True)
        for i in range(BURST)
    ]
    for t in threads:
        t.start()
    time.sleep(3)  # the burst is in: one granted, the rest queued across the replicas
    fleet.replicas[victim].kill()
    t_kill = time.monotonic()
    if holder is not None:  # the loops move to another replica within seconds
        moved = takeover_s(fleet, fleet.replicas[victim], t_kill)
        print(f"leases taken over {moved:.1f} s after the kill")
        assert moved < 10

    with pytest.raises(TTError) as broke:
        list(long_run)
    assert f"{fleet.replicas[victim].url} broke off the command's stream" in broke.value.message
    assert "may have run" in (broke.value.hint or "")
    again = list(anywhere.exec("r-long", ExecRequest.shell("echo again")))
    assert again[-1].kind is EventKind.EXIT and b"again\n" in b"".join(e.data for e in again)
    assert anywhere.delete_env_wait("r-long")  # room for the queued ones

    for t in threads:
        t.join(timeout=600)
    sampler.stop.set()
    assert not any(t.is_alive() for t in threads), outcomes
    assert all(len(o) == 1 for o in outcomes.values()), (outcomes, TRAIL)  # each ended once
    assert all(o[0] == "created" or o[0].startswith("refused: ") for o in outcomes.values())
    assert sum(o == ["created"] for o in outcomes.values()) >= BURST - 1, outcomes
    assert sampler.twice == [] and sampler.most <= CAPACITY, (sampler.twice, sampler.most)
    assert {f"r-burst{i}" for i in range(BURST) if outcomes[f"r-burst{i}"] == ["created"]} <= (
        sampler.seen
    )
    # Nothing lost or leaked: no ENV left on the scheduler, no VM on the host. An ENV whose
    # boot the killed replica had begun was refused ("interrupted") and is taken back by the
    # reaper on the lease's new holder within a few of its passes.
    deadline = time.monotonic() + 60
    while left := anywhere.get("/v1/envs"):
        assert time.monotonic() < deadline, (left, outcomes, TRAIL)
        assert all(e["state"] in ("failed", "deleting") for e in left), (left, outcomes, TRAIL)
        time.sleep(1)
    while [v for v in fleet.hostd.vms() if str(v.get("env", "")).startswith("r-")]:
        assert time.monotonic() < deadline, fleet.hostd.vms()
        time.sleep(1)
    print(f"killed replica {victim + 1}; burst done {time.monotonic() - t_kill:.1f} s later")


# -- the GitHub service, two replicas on one database -------------------------------------------
GH_SECRET = "replica-webhook-secret-51f0"
REPO = "octo-org/replicas"
AMD64 = ["self-hosted", "tt", "debian-12", "amd64"]


@contextlib.contextmanager
def github_pair(f: Fleet, state: Path, url: str, gh: StandIn) -> Iterator[list[str]]:
    """Two `tt-github-webhooks serve` on one database, their scheduler config listing every
    scheduler replica (a dead one too); yields their URLs; both stopped afterwards."""
    private, _ = app_keys()
    key = state / "app.pem"
    key.write_text(private)
    runner = state / "runner"
    runner.mkdir()
    (runner / "run.sh").write_bytes(RUN_SH.read_bytes())
    (runner / "run.sh").chmod(0o755)
    cfg = state / "tt.json"
    cfg.write_text(json.dumps({"server": [r.addr for r in f.replicas], "token": ADMIN}))
    cfg.chmod(0o600)
    procs, urls = [], []
    try:
        for i in (1, 2):
            port = free_port()
            argv = serve_argv(
                state / f"gh{i}", gh.url, key, port, "--push-runner", str(runner),
                "--mem", "384", "--reconcile-interval", "2", "--runner-timeout", "120",
                "--repo", REPO, "--database", url, "--tt-config", str(cfg),
            )  # fmt: skip
            env = {**BASE_ENV, "TT_GH_WEBHOOK_SECRET": GH_SECRET, "XDG_CACHE_HOME": str(state)}
            log = (state / f"gh{i}.log").open("ab")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
            log.close()
            urls.append(f"http://127.0.0.1:{port}")
        for u in urls:
            wait_until(functools.partial(_up, u), 30, f"the GitHub service at {u}")
        yield urls
    finally:
        for p in procs:
            stop(p, grace=30)


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_one_delivery_to_both_github_replicas_makes_one_job_and_one_runner(
    fleet: Fleet, pg: PgCluster, tmp_path: Path
) -> None:
    _, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    jid = 82000001
    gh.add_job(REPO, jid, AMD64, "queued")
    tt = fleet.client(0)  # the first may be dead (the burst test killed one): it fails over
    try:
        with pg.database() as url, github_pair(fleet, tmp_path, url, gh) as (a, b):
            payload = job_event("queued", jid, AMD64, repo=REPO)
            raw = json.dumps(payload, separators=(",", ":")).encode()
            delivery = "5e1f0c3a-0000-4000-8000-000000000001"  # the same delivery, twice
            with ThreadPoolExecutor(2) as pool:
                answers = list(
                    pool.map(
                        lambda u: deliver(
                            u + "/webhook", None, GH_SECRET.encode(), delivery=delivery, body=raw
                        ),
                        (a, b),
                    )
                )
            accepted = [r for r in answers if r.status_code == 202]
            dup = [r for r in answers if r.status_code != 202]
            assert len(accepted) >= 1, [r.text for r in answers]  # the other: "already received"
            assert all("already received" in r.json()["error"] for r in dup), [r.text for r in dup]

            def job() -> dict[str, Any]:
                jobs = requests.get(a + "/jobs", timeout=5).json()
                return next((j for j in jobs if j["id"] == jid), {})

            wait_until(lambda: job().get("state") == "started", 180, "the runner to start")
            assert (
                requests.get(b + "/jobs", timeout=5).json()
                == requests.get(a + "/jobs", timeout=5).json()
            )  # one job, seen alike by both replicas
            ours = [n for n in gh.issued if str(jid) in n]
            assert ours == [f"tt-{jid}-1"], gh.issued  # one JIT runner
            assert len(gh.calls("actions/generate-runner-jitconfig-for-repo")) == 1
            envs = [e["name"] for e in tt.get("/v1/envs") if str(jid) in e["name"]]
            assert envs == [f"gh-{jid}-1"]  # one VM
            gh.jobs[jid]["status"] = "completed"
            done = job_event(
                "completed", jid, AMD64, repo=REPO, runner_name=ours[0], conclusion="success"
            )
            deliver(b + "/webhook", done, GH_SECRET.encode())
            wait_until(lambda: job().get("state") == "done", 90, "the job to end")
            wait_until(lambda: not [e for e in tt.get("/v1/envs")], 60, "its ENV to go")
    finally:
        gh.stop()
        for e in tt.get("/v1/envs"):  # whatever a failed run left (the services are gone)
            tt.delete_env_wait(e["name"])
