"""The load-balancer example, for real: Debian's HAProxy runs docs/operator/haproxy.cfg (only
its addresses filled in) in front of two real tt-scheduler replicas on one PostgreSQL database,
and a real hostd joins through it. Requests pass and are spread, a command's output streams
through it as it comes, pushes and gets pass, and with one replica SIGKILLed every request
still succeeds (HAProxy sends a refused connection to the other replica)."""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.cloudutil import leftovers
from tests.conftest import built_image
from tests.pgcluster import PgCluster
from tests.replicautil import (
    ADMIN,
    SchedulerProc,
    dead_port,
    haproxy,
    own_cache,
    start_hostd,
    start_scheduler,
)
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.proc import stop
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
IMAGE = "qemu:debian-12:amd64"


@dataclass
class Balanced:
    lb: str  # HAProxy's ADDR:PORT
    replicas: list[SchedulerProc]

    def client(self) -> Client:
        return Client(ClientConfig(self.lb, ADMIN))

    def replica_of(self, n: int) -> list[str]:
        """Which replica answered each of n requests (HAProxy's X-TT-Replica header)."""
        out = []
        for _ in range(n):
            r = requests.get(f"http://{self.lb}/v1/status", timeout=10, headers=_auth())
            assert r.status_code == 200, r.text
            out.append(r.headers["X-TT-Replica"])
        return out


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster) -> Iterator[Balanced]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("haproxy")
    with contextlib.ExitStack() as stack:
        stack.enter_context(own_cache(state / "cache"))
        url = stack.enter_context(pg.database())
        replicas = []
        for i in (1, 2):
            s = start_scheduler(state / f"s{i}", "--database", url, "--host-timeout", "5")
            stack.callback(s.stop)
            replicas.append(s)
        dead = f"127.0.0.1:{dead_port()}"  # s3: a replica that is down from the start
        lb = stack.enter_context(haproxy(state, [r.addr for r in replicas] + [dead]))
        hostd = start_hostd(state / "host", lb)  # hostd joins through the balancer
        stack.callback(stop, hostd.proc, grace=30)
        b = Balanced(lb, replicas)
        deadline = time.monotonic() + 60
        while not any(h["state"] == "up" for h in b.client().get("/v1/hosts")):
            assert time.monotonic() < deadline, "the host did not join through HAProxy"
            time.sleep(0.5)
        yield b
    assert leftovers(state / "host") == []


def test_requests_pass_and_spread_over_the_live_replicas(balanced: Balanced) -> None:
    seen = balanced.replica_of(12)
    assert set(seen) == {"s1", "s2"}  # never s3: it is down (refused, then failing checks)
    assert balanced.client().status()["admin"] is True


def test_a_run_streams_through_it_and_a_killed_replica_is_no_outage(balanced: Balanced) -> None:
    c = balanced.client()
    env = c.create_env(EnvRequest("lb1", IMAGE, memory_mib=384, life_s=900))  # progress stream
    try:
        assert env["state"] == "ready"
        script = "for i in 1 2 3; do echo tick $i; sleep 1; done"
        arrived: list[float] = []
        for ev in c.exec("lb1", ExecRequest(("sh", "-c", script))):
            if ev.kind is EventKind.STDOUT:
                arrived.append(time.monotonic())
            last = ev
        assert last.kind is EventKind.EXIT and last.status is not None
        assert last.status.code == 0
        assert len(arrived) >= 3 and arrived[-1] - arrived[0] > 1.5  # as it came, not at the end
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as t:
            data = b"x" * (4 << 20)
            info = tarfile.TarInfo("blob")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        c.push("lb1", "/tmp/in", tar.getvalue())
        got = c.get_files("lb1", "/tmp/in/blob")
        assert len(got) == 1 and got[0]["data"]

        balanced.replicas[0].kill()  # SIGKILL s1: HAProxy has not noticed yet
        t0 = time.monotonic()
        seen = balanced.replica_of(10)
        assert seen == ["s2"] * 10, seen
        out = [ev for ev in c.exec("lb1", ExecRequest(("echo", "still here")))]
        assert out[-1].kind is EventKind.EXIT and b"still here" in b"".join(e.data for e in out)
        assert time.monotonic() - t0 < 30
    finally:
        assert c.delete_env_wait("lb1")
