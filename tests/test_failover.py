"""Clients with several scheduler URLs: the choice logic on its own (pure), then the real clients
(tt's Client, the stdlib run stream, the GitLab driver's stage) against servers on loopback: a
port where nothing listens, a real tt-scheduler, and a scripted stand-in for the failures a
real scheduler cannot show on cue (a reset before the answer, a stream cut half-way)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hostd.service.joiner import Joiner, JoinRefused
from runner_executor.driver import Driver
from tests.replicautil import (
    ADMIN,
    JOIN,
    SchedulerProc,
    answer,
    cut_before_answer,
    dead_port,
    never_accepts,
    standin,
    start_scheduler,
    stream_then_close,
    stream_then_cut,
)
from ttci.client import config
from ttci.client.config import ClientConfig
from ttci.client.exec_stream import exec_events
from ttci.client.failover import (
    AllFailed,
    Failure,
    Servers,
    Sticky,
    may_move,
    retryable_503,
    rotation,
    split_servers,
)
from ttci.client.scheduler import Client
from ttci.model.errors import ApiError, BadInput, TTError
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest, ExitStatus

CMD = ExecRequest(("true",))
HOST_INFO = {
    "machine": "x86_64",
    "accel": "tcg",
    "total": {"cpus": 2, "memory_mib": 2048, "disk_gib": 10},
    "used": {"cpus": 0, "memory_mib": 0, "disk_gib": 0},
    "free": {"cpus": 2, "memory_mib": 2048, "disk_gib": 10},
    "vms": 0,
    "images": [],
}


# -- the choice, pure ---------------------------------------------------------------------------
def test_servers_split_and_rotate_from_the_one_that_answered_last() -> None:
    assert split_servers(" a:1, b:2/,,a:1 ") == ("a:1", "b:2")
    assert split_servers(["x:1", " ", "y:2"]) == ("x:1", "y:2")
    urls = ("a", "b", "c")
    assert rotation(urls, None) == ["a", "b", "c"]
    assert rotation(urls, "b") == ["b", "c", "a"]
    assert rotation(urls, "gone") == ["a", "b", "c"]  # a list changed since: as configured


def test_only_a_request_that_never_reached_a_server_moves_on_unless_it_may_be_repeated() -> None:
    for idempotent in (True, False):
        assert may_move(Failure.CONNECT, idempotent)
        assert may_move(Failure.UNAVAILABLE, idempotent)
    assert may_move(Failure.BROKEN, idempotent=True)
    assert not may_move(Failure.BROKEN, idempotent=False)  # create, push, run: may have acted
    assert retryable_503(503, "1") and retryable_503(503, "")
    assert not retryable_503(503, None)  # e.g. "host unreachable": the scheduler's answer
    assert not retryable_503(500, "1") and not retryable_503(404, "1")
    db_down = json.dumps({"error": "the database is unavailable", "kind": "DatabaseUnavailable"})
    assert retryable_503(503, None, db_down.encode())  # the replica's transaction rolled back
    assert not retryable_503(503, None, b'{"error": "host h1 unreachable", "kind": "X"}')


def test_sticky_memory_outlives_the_process_and_a_daemon_keeps_its_own(tmp_path: Path) -> None:
    path = tmp_path / "urls.json"
    Sticky(path).remember(("a", "b"), "b")
    assert Sticky(path).first(("a", "b")) == "b"  # the next process starts with b
    assert Sticky(path).first(("b", "a")) is None  # another list
    assert Sticky(path).first(("a",)) is None
    quiet = Sticky(tmp_path / "no.json", persist=False)
    quiet.remember(("a", "b"), "a")
    assert quiet.first(("a", "b")) == "a" and not (tmp_path / "no.json").exists()


class Refused(Exception):
    pass


class Broken(Exception):
    pass


def _kind(e: Exception) -> Failure | None:
    return {Refused: Failure.CONNECT, Broken: Failure.BROKEN}.get(type(e))


def test_a_call_walks_the_list_and_stops_at_the_first_answer_or_decision(tmp_path: Path) -> None:
    servers = Servers(("a", "b", "c"), Sticky(tmp_path / "s.json"))
    tried: list[str] = []

    def send(url: str) -> str:
        tried.append(url)
        if url == "a":
            raise Refused("connection refused")
        return f"answer from {url}"

    assert servers.call(send, _kind, idempotent=False) == "answer from b"
    assert tried == ["a", "b"] and servers.order() == ["b", "c", "a"]

    def broken_b(url: str) -> str:
        tried.append(url)
        raise Broken("reset") if url == "b" else Refused("refused")

    tried.clear()
    with pytest.raises(Broken):  # a POST that may have reached b is not sent to c
        servers.call(broken_b, _kind, idempotent=False)
    assert tried == ["b"]
    tried.clear()
    with pytest.raises(AllFailed) as e:  # a GET goes on: c, then a
        servers.call(broken_b, _kind, idempotent=True)
    assert tried == ["b", "c", "a"]
    assert "cannot reach the scheduler at any of b, c, a" in e.value.message
    assert "b: reset" in e.value.message and "a: refused" in e.value.message

    def decides(url: str) -> str:
        raise ValueError("no")  # a decision (4xx) is not a failure to reach: raised at once

    with pytest.raises(ValueError):
        servers.call(decides, _kind, idempotent=True)


def test_the_client_config_takes_a_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "client.json"
    monkeypatch.setenv("TT_CONFIG", str(path))
    monkeypatch.delenv("TT_SERVER", raising=False)
    monkeypatch.delenv("TT_CA_FILE", raising=False)
    config.save("10.0.0.1:7400, https://10.0.0.2:7400", "tok")
    assert json.loads(path.read_text())["server"] == ["10.0.0.1:7400", "https://10.0.0.2:7400"]
    cfg = config.load()
    assert cfg.urls == ("http://10.0.0.1:7400", "https://10.0.0.2:7400")
    assert cfg.url == "http://10.0.0.1:7400"
    monkeypatch.setenv("TT_SERVER", "a:1,b:2")
    assert config.load().urls == ("http://a:1", "http://b:2")
    with pytest.raises(BadInput, match="does not parse"):
        config.save("10.0.0.1:7400,nonsense", None)
    path.write_text(json.dumps({"server": {"a": 1}, "token": "t"}))
    monkeypatch.delenv("TT_SERVER")
    with pytest.raises(BadInput, match="neither an address nor a list"):
        config.load()


# -- the real clients on loopback ---------------------------------------------------------------
@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the sticky file


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchedulerProc]:
    s = start_scheduler(tmp_path_factory.mktemp("sched"))
    yield s
    s.stop()


def _dead() -> str:
    return f"127.0.0.1:{dead_port()}"


def test_tt_skips_a_dead_replica_and_asks_the_live_one_first_next_time(
    sched: SchedulerProc, tmp_path: Path
) -> None:
    dead = _dead()
    cfg = ClientConfig(f"{dead},{sched.addr}", ADMIN)
    assert Client(cfg).status()["admin"] is True
    assert Client(cfg).servers.order()[0] == sched.url  # a new client (same process)
    cached = json.loads((tmp_path / "cache" / "tt" / "scheduler-urls.json").read_text())
    assert cached == {f"http://{dead}\n{sched.url}": sched.url}  # ... and the next process
    # Every kind of request moves on after a refused connect; the live one's answer is final.
    c = Client(ClientConfig(f"{_dead()},{sched.addr}", ADMIN))
    with pytest.raises(ApiError) as e:
        c.push("nope", "/tmp", b"")
    assert e.value.status == 404 and "nope" in e.value.message
    with pytest.raises(ApiError) as e:
        list(exec_events(ClientConfig(f"{_dead()},{sched.addr}", ADMIN), "nope", CMD))
    assert e.value.status == 404
    with pytest.raises(TTError) as refused:
        c.create_env({"name": "x", "os_prefix": "debian-12:amd64"})
    assert "debian-12" in refused.value.message  # no such image: the scheduler's answer


def test_no_replica_reachable_names_each(tmp_path: Path) -> None:
    a, b = _dead(), _dead()
    with pytest.raises(TTError) as e:
        Client(ClientConfig(f"{a},{b}", "t")).status()
    assert f"any of http://{a}, http://{b}" in e.value.message and "refused" in e.value.message
    assert e.value.hint and "tt-scheduler" in e.value.hint
    with pytest.raises(TTError, match=f"any of http://{a}, http://{b}"):
        list(exec_events(ClientConfig(f"{a},{b}", "t"), "e", CMD))


def test_a_decision_is_final_and_a_retryable_503_moves_on() -> None:
    refusal = json.dumps({"error": "no such ENV e", "kind": "EnvNotFound"}).encode()
    busy = json.dumps({"error": "database failing over"}).encode()
    with (
        standin(answer(404, refusal)) as first,
        standin(answer(200, b'{"ok": true}')) as second,
    ):
        c = Client(ClientConfig(f"{first.url},{second.url}", "t"))
        with pytest.raises(ApiError, match="no such ENV e"):
            c.show_env("e")
        with pytest.raises(ApiError, match="no such ENV e"):
            c.create_env({"name": "e"})
        assert second.seen == []
    with (
        standin(answer(503, busy, {"Retry-After": "2"})) as first,
        standin(answer(200, b'{"ok": true}')) as second,
    ):
        c = Client(ClientConfig(f"{first.url},{second.url}", "t"))
        assert c.call_json("POST", "/v1/envs/e/extend") == {"ok": True}
        assert first.seen == [("POST", "/v1/envs/e/extend")] == second.seen
    with (
        standin(answer(503, b'{"error": "host h1 is unreachable"}')) as first,
        standin(answer(200)) as second,
    ):
        with pytest.raises(ApiError, match="unreachable"):  # no Retry-After: the answer
            Client(ClientConfig(f"{first.url},{second.url}", "t")).status()
        assert second.seen == []


def test_a_request_cut_before_its_answer_is_repeated_only_if_it_may_be() -> None:
    with standin(cut_before_answer) as first, standin(answer(200, b"{}")) as second:
        c = Client(ClientConfig(f"{first.url},{second.url}", "t"))
        with pytest.raises(TTError) as e:
            c.create_env({"name": "e"})
        assert f"scheduler at {first.url} broke before it answered POST" in e.value.message
        assert "may have been carried out" in (e.value.hint or "")
        with pytest.raises(TTError, match="may have run"):
            list(exec_events(ClientConfig(f"{first.url},{second.url}", "t"), "e", CMD))
        assert second.seen == []  # neither the create nor the run was sent twice
        assert c.show_env("e") == {}  # a GET is: the second answers
        assert second.seen == [("GET", "/v1/envs/e")]


def _line(ev: ExecEvent) -> bytes:
    return json.dumps(ev.to_dict()).encode() + b"\n"


def test_a_run_stream_that_breaks_names_the_replica_and_is_not_sent_again() -> None:
    first_out = _line(ExecEvent.output(EventKind.STDOUT, b"half\n", vm="v"))
    whole = [first_out, _line(ExecEvent.exit(ExitStatus(0), vm="v"))]
    with (
        standin(stream_then_cut([first_out])) as first,
        standin(answer(200, b"".join(whole))) as second,
    ):
        events = exec_events(ClientConfig(f"{first.url},{second.url}", "t"), "e", CMD)
        assert next(events).data == b"half\n"
        with pytest.raises(TTError) as e:
            next(events)
        assert f"the scheduler at {first.url} broke off the command's stream" in e.value.message
        assert "may have run" in (e.value.hint or "")
        assert second.seen == []
        # The user (or CI) runs it again: it goes to the other replica.
        again = list(exec_events(ClientConfig(f"{second.url},{first.url}", "t"), "e", CMD))
        assert again[-1].kind is EventKind.EXIT and second.seen == [("POST", "/v1/envs/e/run")]


def test_a_run_stream_that_ends_before_the_command_did_is_a_broken_one() -> None:
    half = [_line(ExecEvent.output(EventKind.STDOUT, b"half\n", vm="v"))]
    with standin(stream_then_close(half)) as gone:
        events = exec_events(ClientConfig(gone.url, "t"), "e", CMD)
        assert next(events).data == b"half\n"
        with pytest.raises(TTError, match=f"{gone.url} broke off the command's stream") as e:
            next(events)
        assert "may have run" in (e.value.hint or "")


def test_a_get_that_breaks_off_names_the_replica() -> None:
    with standin(stream_then_cut([b'[{"vm": "v", "data": "'])) as gone:
        with pytest.raises(TTError, match=f"scheduler at {gone.url} broke off its answer") as e:
            Client(ClientConfig(f"{_dead()},{gone.url}", "t")).get_files("e", "/x")
        assert "any replica will do" in (e.value.hint or "")


def test_a_replica_that_never_accepts_is_skipped_after_the_connect_timeout() -> None:
    body = _line(ExecEvent.exit(ExitStatus(0)))
    with never_accepts() as off, standin(answer(200, body)) as live:
        t0 = time.monotonic()
        out = list(exec_events(ClientConfig(f"{off},{live.url}", "t"), "e", CMD, 1.0))
        took = time.monotonic() - t0
    assert out[-1].kind is EventKind.EXIT and 0.9 < took < 5


def test_the_gitlab_stage_runs_on_the_live_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [ExecEvent.output(EventKind.STDOUT, b"built\n"), ExecEvent.exit(ExitStatus(0))]
    with standin(answer(200, b"".join(_line(e) for e in events))) as live:
        monkeypatch.setenv("TT_SERVER", f"{_dead()},{live.url}")
        monkeypatch.setenv("TT_TOKEN", "t")
        monkeypatch.setenv("TT_CONFIG", str(tmp_path / "none.json"))
        script = tmp_path / "script"
        script.write_text("make\n")
        out, err = io.BytesIO(), io.BytesIO()
        env = {"CUSTOM_ENV_CI_JOB_ID": "42", "TMPDIR": str(tmp_path)}
        assert Driver(env, out=out, err=err).run(script, "build_script") == 0
        assert out.getvalue() == b"built\n" and live.seen == [("POST", "/v1/envs/gl-42/run")]


def test_requests_connect_failures_are_told_apart_from_broken_ones() -> None:
    """urllib3 names a DNS failure NameResolutionError, a NewConnectionError like a refusal;
    no lookup is made here (network safety): the classes themselves are checked."""
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    assert issubclass(NameResolutionError, NewConnectionError)
    assert issubclass(requests.exceptions.ConnectTimeout, requests.ConnectionError)


def _joiner(urls: list[str], join: str = JOIN) -> Joiner:
    return Joiner(
        scheduler=",".join(urls),
        join_token=join,
        host_id="hf",
        advertise_url="http://127.0.0.1:7499",
        host_token="h" * 24,
        info=lambda: dict(HOST_INFO),
    )


def test_hostd_joins_through_the_live_replica_and_beats_there(sched: SchedulerProc) -> None:
    j = _joiner([f"http://{_dead()}", sched.url])
    moved: list[str] = []
    j.on_move = moved.append  # the image fetcher follows it
    j.register()
    j.beat()
    assert j.url == sched.url and moved == [sched.url]
    hosts = Client(ClientConfig(sched.addr, ADMIN)).get("/v1/hosts")
    assert [h["state"] for h in hosts if h["id"] == "hf"] == ["up"]


def test_hostd_takes_a_refusal_from_the_first_replica_as_final(sched: SchedulerProc) -> None:
    refusal = json.dumps({"error": "wrong join token"}).encode()
    with (
        standin(answer(403, refusal)) as first,
        pytest.raises(JoinRefused, match="wrong join token"),
    ):
        _joiner([first.url, sched.url]).register()
    with pytest.raises(JoinRefused, match="join token"):  # the live one refuses a bad token too
        _joiner([f"http://{_dead()}", sched.url], join="wrong-" + JOIN).register()


def test_join_takes_replicas_each_with_its_scheme(tmp_path: Path) -> None:
    from hostd.service.serve import _join_urls

    assert _join_urls("10.0.0.1:7400, https://10.0.0.2:7400", None) == (
        "http://10.0.0.1:7400",
        "https://10.0.0.2:7400",
    )
    ca = tmp_path / "ca.pem"
    assert _join_urls("10.0.0.1:7400,10.0.0.2:7400", ca) == (
        "https://10.0.0.1:7400",
        "https://10.0.0.2:7400",
    )
    with pytest.raises(BadInput, match="--join"):
        _join_urls("10.0.0.1:7400,nonsense", None)
