"""Every shape that crosses a process: round trips, the field names on the wire, and refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ttci.model.errors import ApiError, BadInput
from ttci.wire.agent_protocol import ExitStatus, MsgType, ProtocolError, encode_json, exec_payload
from ttci.wire.api import API_VERSION, ApiVersionError, ErrorBody, api_error
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest
from ttci.wire.envs import EnvEvent, EnvRequest, VMRequest, VmUp, parse_duration
from ttci.wire.hosts import Heartbeat, HostRegistration, JoinAnswer
from ttci.wire.jobs import RESULTS, JobResult


def _through_json(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d))


# -- exit status -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status",
    [
        ExitStatus(0),
        ExitStatus(3, timeout=600),
        ExitStatus(None, signal=9),
        ExitStatus(None, signal=15, timed_out=True, timeout=2.5),
        ExitStatus(None, signal=15, cancelled=True),
    ],
)
def test_exit_status_round_trip(status: ExitStatus) -> None:
    assert ExitStatus.from_dict(_through_json(status.to_dict())) == status


def test_exit_frame_bytes_are_unchanged() -> None:
    """The agent's EXIT payload is what it was before ExitStatus (images in the field)."""
    old = {"code": 3, "signal": None, "timed_out": False, "timeout": None, "cancelled": False}
    assert encode_json(MsgType.EXIT, 5, ExitStatus(3).to_dict()) == encode_json(
        MsgType.EXIT, 5, old
    )


def test_exec_frame_bytes_are_unchanged() -> None:
    assert encode_json(MsgType.EXEC, 1, exec_payload(("uname", "-m"))) == (
        b"TT\x01\x03\x00\x00\x00\x01\x00\x00\x00\x25" + b'{"argv":["uname","-m"],"stdin":false}'
    )
    full = exec_payload(["sh"], env={"A": "b"}, cwd="/root", stdin=True, timeout=5)
    assert full == {"argv": ["sh"], "env": {"A": "b"}, "cwd": "/root", "stdin": True, "timeout": 5}


def test_exit_status_is_immutable_and_checks_types() -> None:
    st = ExitStatus(0)
    with pytest.raises(AttributeError):
        st.code = 1  # type: ignore[misc]
    assert st.ok and not ExitStatus(1).ok and hash(st) == hash(ExitStatus(0))
    with pytest.raises(ProtocolError, match="code"):
        ExitStatus.from_dict({"code": "3"})
    with pytest.raises(ProtocolError, match="timed_out"):
        ExitStatus.from_dict({"code": 0, "timed_out": 1})


def test_exit_status_words() -> None:
    assert ExitStatus(3).text() == "exit code 3"
    assert ExitStatus(None, signal=9).text() == "killed by signal 9"
    assert ExitStatus(None, timed_out=True, timeout=2).text() == "timed out after 2 s"
    assert ExitStatus(None, cancelled=True).text() == "cancelled"


# -- exec request ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "req",
    [
        ExecRequest(("uname", "-a")),
        ExecRequest.shell("echo hi", timeout=5, vms=("a", "b")),
        ExecRequest(("cat",), env={"CI": "true"}, cwd="/root", stdin=b"\x00\xffbytes"),
        ExecRequest(("true",), stdin=b"", timeout=1.5),
    ],
)
def test_exec_request_round_trip(req: ExecRequest) -> None:
    assert ExecRequest.from_dict(_through_json(req.to_dict())) == req


def test_exec_request_wire_names() -> None:
    d = ExecRequest(("cat",), env={"A": "b"}, cwd="/", stdin=b"hi", timeout=3, vms=("x",)).to_dict()
    assert d == {
        "api": API_VERSION,
        "argv": ["cat"],
        "env": {"A": "b"},
        "cwd": "/",
        "timeout": 3,
        "stdin_b64": "aGk=",
        "vms": ["x"],
    }
    assert "vms" not in ExecRequest(("cat",), vms=("x",)).on_vm().to_dict()
    assert ExecRequest.from_dict({"cmd": "uname"}).argv == ("/bin/sh", "-c", "uname")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "argv must be a non-empty list of strings"),
        ({"argv": []}, "argv must be a non-empty list"),
        ({"argv": ["a", 1]}, "argv must be a non-empty list"),
        ({"cmd": " "}, "cmd must be a non-empty string"),
        ({"cmd": "a", "argv": ["a"]}, "cmd or argv, not both"),
        ({"argv": ["a"], "env": {"A": 1}}, "env must be an object of strings"),
        ({"argv": ["a"], "cwd": "tmp"}, "cwd must be an absolute path"),
        ({"argv": ["a"], "timeout": 0}, "not a positive number"),
        ({"argv": ["a"], "timeout": True}, "not a positive number"),
        ({"argv": ["a"], "stdin_b64": "!!"}, "stdin_b64 is not base64"),
        ({"argv": ["a"], "vms": "a"}, "vms must be a list of VM names"),
        ([1], "must be a JSON object"),
    ],
)
def test_exec_request_refusals_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(BadInput, match=message) as e:
        ExecRequest.from_dict(body)
    assert e.value.hint


def test_another_api_version_is_refused() -> None:
    with pytest.raises(ApiVersionError, match="API version 2"):
        ExecRequest.from_dict({"api": 2, "argv": ["a"]})


# -- exec events -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ev",
    [
        ExecEvent.start(),
        ExecEvent.output("stdout", b"line\n", vm="debian-12-amd64"),
        ExecEvent.output(EventKind.STDERR, b"\xff\x00"),
        ExecEvent.exit(ExitStatus(0), vm="a"),
        ExecEvent.exit(ExitStatus(None, signal=9, timed_out=True, timeout=10)),
        ExecEvent.error("VM is lost", lost=True, vm="b"),
        ExecEvent.error("no such VM"),
    ],
)
def test_exec_event_round_trip(ev: ExecEvent) -> None:
    assert ExecEvent.from_dict(_through_json(ev.to_dict())) == ev


def test_exec_event_wire_shapes() -> None:
    assert ExecEvent.output("stdout", b"hi", vm="a").to_dict() == {
        "event": "stdout",
        "data": "aGk=",
        "vm": "a",
    }
    assert ExecEvent.exit(ExitStatus(3)).to_dict() == {
        "event": "exit",
        "code": 3,
        "signal": None,
        "timed_out": False,
        "timeout": None,
        "cancelled": False,
    }
    assert ExecEvent.error("gone", lost=True).to_dict() == {
        "event": "error",
        "message": "gone",
        "lost": True,
    }
    # what older hostds and the ssh path send: only some of the fields
    ev = ExecEvent.from_dict({"event": "exit", "vm": "a", "code": None, "timed_out": True})
    assert ev.status == ExitStatus(None, timed_out=True) and ev.final
    assert not ExecEvent.output("stdout", b"").final


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"event": "done"}, "kind 'done' is unknown"),
        ({"event": "stdout", "data": "%%"}, "not base64"),
        ({"event": "exit", "code": "0"}, "not a whole number"),
        ({"event": "error", "lost": "yes"}, "not a boolean"),
        ({"event": "stdout", "vm": 3}, "is not a name"),
    ],
)
def test_bad_exec_events_are_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        ExecEvent.from_dict(body)


# -- ENV and VM requests ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "req",
    [
        EnvRequest("ci-1", "debian-12"),
        EnvRequest(
            "gl-4711",
            "qemu:debian-12:arm64",
            cpus=2,
            memory_mib=1024,
            disk_gib=20,
            dup_each=3,
            life_s=1500,
            deny_outgoing=True,
            vm_ports=((22, "tcp"), (53, "udp")),
            origin={"kind": "gitlab", "job": "4711", "url": "https://gitlab.example.test/j/4711"},
        ),
    ],
)
def test_env_request_round_trip(req: EnvRequest) -> None:
    assert EnvRequest.from_dict(_through_json(req.to_dict())) == req


def test_env_request_wire_names_are_the_clis() -> None:
    d = EnvRequest("a", "x", life_s=90, vm_ports=((22, "tcp"),)).to_dict()
    assert d["life_time"] == 90 and d["vm_ports"] == "22/tcp" and d["api"] == API_VERSION
    req = EnvRequest.from_dict({"name": "a", "os_prefix": "x", "life_time": "1h", "vm_ports": "22"})
    assert (req.life_s, req.vm_ports, req.origin) == (3600, ((22, "tcp"),), {"kind": "cli"})
    assert parse_duration("30m") == 1800


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"os_prefix": "x"}, "lacks 'name'"),
        ({"name": "A!", "os_prefix": "x"}, "ENV name 'A!' is not valid"),
        ({"name": "a", "os_prefix": "x", "cpus": "many"}, "malformed"),
        ({"name": "a", "os_prefix": "x", "life_time": "forever"}, "does not parse"),
        ({"name": "a", "os_prefix": "x", "vm_ports": "22,22"}, "asked for twice"),
        ({"name": "a", "os_prefix": "x", "deny_outgoing": "yes"}, "true or false"),
        ({"name": "a", "os_prefix": "x", "origin": {"kind": "svn"}}, "origin.kind"),
    ],
)
def test_env_request_refusals(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        EnvRequest.from_dict(body)


def test_vm_request_round_trip_and_wire_names() -> None:
    req = VMRequest(
        "abc123",
        "ci-1",
        "debian-12-amd64",
        "alice",
        "qemu:debian-12:amd64",
        cpus=2,
        memory_mib=768,
        disk_gib=8,
        deny_outgoing=True,
        ports=((22, "tcp"), (8080, "tcp")),
    )
    d = _through_json(req.to_dict())
    assert d["ports"] == "22/tcp,8080/tcp" and d["id"] == "abc123"
    assert VMRequest.from_dict(d) == req
    with pytest.raises(BadInput, match="VM request is malformed"):
        VMRequest.from_dict({"env": "ci-1"})


def test_env_events_round_trip() -> None:
    events = [
        EnvEvent("vm", vm=VmUp("a", "h1", "qemu:debian-12:amd64", 1.5, "kvm")),
        EnvEvent("ready", env={"name": "ci-1", "vms": []}),
        EnvEvent("error", error=ErrorBody("no room", "free some"), status=409),
    ]
    for ev in events:
        assert EnvEvent.from_dict(_through_json(ev.to_dict())) == ev
    assert events[0].to_dict()["event"] == "vm" and events[0].to_dict()["vm"] == "a"
    assert [ev.final for ev in events] == [False, True, True]


# -- hosts -----------------------------------------------------------------------------------
def test_host_registration_and_heartbeat_round_trip() -> None:
    reg = HostRegistration("h1", "http://10.0.0.1:8081", "t" * 20, info={"machine": "x86_64"})
    assert HostRegistration.from_dict(_through_json(reg.to_dict())) == reg
    beat = Heartbeat("h1", info={"vms": 3})
    assert Heartbeat.from_dict(_through_json(beat.to_dict())) == beat
    ans = JoinAnswer("h1", 5.0)
    assert JoinAnswer.from_dict(_through_json(ans.to_dict())) == ans


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"id": "Bad Id"}, BadInput, "host id 'Bad Id' is not valid"),
        ({"id": "h", "url": "ftp://x"}, BadInput, "http://ADDR:PORT"),
        ({"id": "h", "url": "http://a:1", "api": 99}, ApiVersionError, "API version 99"),
        ({"id": "h", "url": "http://a:1"}, ApiVersionError, "API version None"),
        ({"id": "h", "url": "http://a:1", "api": 1, "token": "short"}, BadInput, "16\\+ chars"),
        (
            {"id": "h", "url": "http://a:1", "api": 1, "token": "t" * 16, "info": []},
            BadInput,
            "info must be an object",
        ),
    ],
)
def test_bad_registrations(body: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        HostRegistration.from_dict(body)


def test_heartbeat_needs_info() -> None:
    with pytest.raises(BadInput, match="heartbeat info must be an object"):
        Heartbeat.from_dict({"id": "h1"})


# -- job results -----------------------------------------------------------------------------
def test_job_result_round_trip_and_weight() -> None:
    for word in RESULTS:
        assert JobResult.from_dict(_through_json(JobResult(word).to_dict())) == JobResult(word)
    assert JobResult("failed").worse(JobResult("success")) == JobResult("failed")
    assert JobResult("success").worse(JobResult("error")) == JobResult("error")
    assert JobResult("success").worse(None) == JobResult("success")
    with pytest.raises(BadInput, match="result is missing"):
        JobResult.from_dict({})
    with pytest.raises(BadInput, match="'fine' is not one of"):
        JobResult.from_dict({"result": "fine"})
    with pytest.raises(BadInput, match="5 is not one of"):
        JobResult.from_dict({"result": 5})


# -- error bodies ----------------------------------------------------------------------------
def test_error_bodies_decode_into_our_errors() -> None:
    body = ErrorBody("no ENV named 'x'", "see `tt env list`", "EnvNotFound")
    assert ErrorBody.decode(json.dumps(body.to_dict()).encode()) == body
    e = api_error(404, json.dumps(body.to_dict()))
    assert isinstance(e, ApiError) and e.status == 404 and e.hint == "see `tt env list`"
    e = api_error(400, b'{"error": "bad", "hint": "fix it"}')
    assert isinstance(e, BadInput) and (e.message, e.hint) == ("bad", "fix it")
    assert api_error(502, b"<html>Bad Gateway</html>").message == "<html>Bad Gateway</html>"
    assert api_error(502, b"", "Bad Gateway").message == "Bad Gateway"
    assert ErrorBody.decode(b"[1, 2]").error == "[1, 2]"
