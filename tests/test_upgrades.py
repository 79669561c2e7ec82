"""Upgrades without a flag day (docs/upgrading.md).

Agent protocol: the host negotiates the version in HELLO, so an image built by the previous
release keeps working. Its agent is the real one of that release (the files an image of it
holds, taken from git at PREVIOUS_AGENT), run over a socketpair like tests/test_agent_local.py,
and driven by this release's host client.

HTTP API: a receiver takes documents of its API version and the previous one, and the scheduler
speaks to each host in the host's version. The next release's scheduler is this code with the
version numbers raised by one (API 2, taking 1 and 2); the host of this release (API 1) it must
keep serving registers, beats and is sent VMs in API 1, which is all a host of 1 accepts.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.vm.agent_client import AgentClient, _handshake
from ttci.agent import main as guest_agent
from ttci.model.errors import AgentError
from ttci.scheduler.hostd_client import HostdClient
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web.api import create_app
from ttci.wire import api
from ttci.wire.agent_protocol import (
    CONTROL,
    PROTOCOL_VERSION,
    Decoder,
    MsgType,
    encode_json,
    negotiate,
)
from ttci.wire.envs import VMRequest

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose guest agent speaks protocol 1 only (release 0.1.0's images): it wants
# HELLO's "version" to be exactly 1 and knows no "versions".
PREVIOUS_AGENT = "853619ae4f706cc7ea823199ab32850c2eec67b1"
# ttci's guest modules in that release's images (hostd/images/guest_files.py AGENT_MODULES).
PREVIOUS_MODULES = (
    "__init__.py",
    "wire/__init__.py",
    "wire/agent_protocol.py",
    "agent/__init__.py",
    "agent/main.py",
)
TOKEN = "s3cret-token"


# -- the agent protocol ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def previous_agent_dir() -> Path:
    """ttci's guest modules as an image of the previous release holds them (kept in
    tests/data/previous_agent, copied from PREVIOUS_AGENT: CI's clone needs no history)."""
    out = ROOT / "tests/data/previous_agent"
    for module in PREVIOUS_MODULES:
        assert (out / "ttci" / module).is_file(), f"tests/data lacks the previous {module}"
    source = (out / "ttci/wire/agent_protocol.py").read_text()
    assert "PROTOCOL_VERSION = 1" in source and '"versions"' not in source
    return out


@pytest.fixture
def previous_agent(previous_agent_dir: Path, tmp_path: Path) -> Iterator[socket.socket]:
    """The previous release's agent serving one end of a socketpair (in its own process)."""
    host, guest = socket.socketpair()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ttci\n"
        "assert ttci.__file__.startswith(sys.argv[1]), ttci.__file__\n"
        "from ttci.agent import main\n"
        "main.serve_fd(int(sys.argv[2]), sys.argv[3])\n"
    )
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(previous_agent_dir), str(guest.fileno()), TOKEN],
            pass_fds=(guest.fileno(),),
            cwd=previous_agent_dir,
            stderr=log,
        )
    guest.close()
    yield host
    proc.kill()
    proc.wait()
    host.close()


def test_an_image_of_the_previous_release_keeps_working(previous_agent: socket.socket) -> None:
    hello = _handshake(previous_agent, TOKEN, time.monotonic() + 20)
    assert hello["version"] == 1  # the old agent's: this session speaks protocol 1
    client = AgentClient(previous_agent, hello)
    status, out, err = client.output(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (status.code, out, err) == (3, b"out\n", b"err\n")
    status, out, _ = client.output(["cat"], stdin=b"through stdin\n")
    assert status.ok and out == b"through stdin\n"


@pytest.fixture
def agent() -> Iterator[socket.socket]:
    """This release's agent on one end of a socketpair (as tests/test_agent_local.py runs it)."""
    host, guest = socket.socketpair()
    stop = threading.Event()
    t = threading.Thread(
        target=guest_agent.serve_fd, args=(guest.fileno(), TOKEN, stop), daemon=True
    )
    t.start()
    yield host
    stop.set()
    host.close()
    t.join(10)
    guest.close()


def _hello(sock: socket.socket, **offer: Any) -> tuple[MsgType, dict[str, Any]]:
    """Say HELLO as a host that offers `offer` would; the agent's answer."""
    body = {"token": TOKEN, "time": time.time(), "nonce": "n1", **offer}
    sock.sendall(encode_json(MsgType.HELLO, CONTROL, body))
    decoder, deadline = Decoder(), time.monotonic() + 10
    sock.settimeout(10)
    while time.monotonic() < deadline:
        for frame in decoder.feed(sock.recv(1 << 16)):
            return frame.type, frame.json()
    raise AssertionError("no answer")


@pytest.mark.parametrize(
    ("offer", "spoken"),
    [
        ({"version": 1}, 1),  # a host of the previous release: protocol 1, no list
        ({"version": 1, "versions": [1, 2]}, 2),  # this release's host
        ({"version": 1, "versions": [1, 2, 3]}, 2),  # the next release's host
    ],
    ids=["previous host", "this host", "next host"],
)
def test_the_agent_speaks_the_highest_version_both_know(
    agent: socket.socket, offer: dict[str, Any], spoken: int
) -> None:
    kind, body = _hello(agent, **offer)
    assert kind is MsgType.HELLO_OK and body["version"] == spoken, body
    assert body["features"]  # IDENTITY is offered as before, whatever the version


def test_no_common_version_is_refused_by_name(agent: socket.socket) -> None:
    kind, body = _hello(agent, version=3, versions=[3, 4])
    assert kind is MsgType.ERROR and "protocol" in body["message"], body
    assert negotiate({"version": True}) is None  # True == 1 in Python; not a version


def test_the_host_refuses_a_version_it_did_not_offer() -> None:
    host, guest = socket.socketpair()

    def future_agent() -> None:
        (frame,) = Decoder().feed(guest.recv(1 << 16))
        answer = {"version": PROTOCOL_VERSION + 5, "nonce": frame.json()["nonce"]}
        guest.sendall(encode_json(MsgType.HELLO_OK, CONTROL, answer))

    threading.Thread(target=future_agent, daemon=True).start()
    with pytest.raises(AgentError, match=f"chose protocol {PROTOCOL_VERSION + 5}"):
        _handshake(host, TOKEN, time.monotonic() + 10)
    host.close()
    guest.close()


# -- the HTTP API ------------------------------------------------------------------------------
ADMIN = "admin-secret-" + "u" * 24
JOIN = "join-secret-" + "u" * 24
HOST_TOKEN = "host-secret-" + "u" * 24


@pytest.fixture
def next_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """This code as the next release: API 2, taking 1 and 2 (every module's imported name)."""
    monkeypatch.setattr(api, "API_VERSIONS", (api.API_VERSION, api.API_VERSION + 1))
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if name.startswith(("ttci", "hostd", "webhooks")) and getattr(mod, "API_VERSION", 0) == 1:
            monkeypatch.setattr(mod, "API_VERSION", 2)


def _report(version: int) -> dict[str, Any]:
    return {
        "api": version,
        "version": "0.1.0",
        "machine": "x86_64",
        "total": {"cpus": 8, "memory_mib": 16384, "disk_gib": 100},
        "used": {"cpus": 0, "memory_mib": 0, "disk_gib": 0},
        "images": [],
    }


@pytest.mark.usefixtures("next_release")
def test_the_next_scheduler_takes_a_host_of_this_release(tmp_path: Path) -> None:
    assert api.API_VERSION == 2 and api.API_VERSIONS == (1, 2)
    s = Scheduler(tmp_path, {}, admin_token=ADMIN, join_token=JOIN, host_timeout=3600)
    try:
        c = create_app(s).test_client()
        reg = {"id": "old", "url": "http://127.0.0.1:9", "token": HOST_TOKEN, "info": _report(1)}
        join = {"Authorization": f"Bearer {JOIN}"}
        r = c.post("/v1/hosts/register", json={"api": 1, **reg}, headers=join)
        assert r.status_code == 200, r.json
        beat = {"api": 1, "id": "old", "info": _report(1)}
        r = c.post(
            "/v1/hosts/heartbeat", json=beat, headers={"Authorization": f"Bearer {HOST_TOKEN}"}
        )
        assert r.status_code == 200, r.json
        assert s.pool.client("old").api == 1  # spoken to in its own version
        r = c.post("/v1/hosts/register", json={"api": 0, **reg, "id": "older"}, headers=join)
        assert r.status_code == 403
        assert "speaks API version 0; this side speaks 1 and 2" in r.json["error"]
        assert "upgrade the scheduler first" in r.json["hint"]
        # A client of this release (API 1) is served too.
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = c.post(
            "/v1/envs",
            json={"api": 1, "name": "x", "images": ["nope:debian-12:amd64"]},
            headers=admin,
        )
        assert r.status_code != 403, r.json
    finally:
        s.stop()


class _PreviousHostd:
    """What a hostd of this release does with a request document: exactly API 1, or 403."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def request(self, method: str, url: str, **kw: Any) -> Any:
        doc = kw.get("json")
        self.seen.append(doc)
        ok = doc.get("api") == 1
        body = json.dumps({"id": "vm-1"} if ok else {"error": "speaks API version 2"})
        r = __import__("requests").Response()
        r.status_code, r._content = (200 if ok else 403), body.encode()
        return r


@pytest.mark.usefixtures("next_release")
def test_the_next_scheduler_sends_a_host_of_this_release_its_version() -> None:
    req = VMRequest("vm-1", "e", "e-1", "alice", "qemu:debian-12:amd64")
    assert req.to_dict()["api"] == 2  # the next release's documents
    old = _PreviousHostd()
    client = HostdClient("old", "http://127.0.0.1:9", HOST_TOKEN, api=1)
    client.session.request = old.request  # type: ignore[method-assign]
    assert client.create_vm(req) == {"id": "vm-1"}
    assert old.seen[-1]["api"] == 1
    current = HostdClient("new", "http://127.0.0.1:9", HOST_TOKEN)  # a host of its own version
    current.session.request = old.request  # type: ignore[method-assign]
    with pytest.raises(Exception, match="speaks API version 2"):
        current.create_vm(req)
    assert old.seen[-1]["api"] == 2
