"""Guests are untrusted (issue 14): hostile guests and a hostile host peer, on loopback.

- hostd's agent client against a fake guest over a socketpair: malformed frames of every kind
  end that session only (a clear reason; another VM's session keeps working), a flood of stdout
  at a slow reader stays within CHANNEL_BUFFER + one frame (backpressure), a capped command is
  killed in the guest.
- the real guest agent against malformed host frames: it answers ERROR and keeps serving; the
  agent credential comes with the first HELLO after boot (trust on first use), never again.
- the extractors of `tt job run --artifact` and `tt env get` against tar archives with links,
  devices, FIFOs, escaping paths and members nobody asked for (the documented attack: a
  `.git/hooks/post-checkout` and a `Jenkinsfile` next to the artifact): nothing is written,
  the error is clear, `tt job run` records "error" (not "cancelled"), exit codes are right.
- hostd's push and get routes, driven through its real Flask app against the real agent running
  commands on this machine: size caps enforced while streaming; the guest's tar gets `--`.

A real VM run (secrets on the host's process list, logs and domain XML) is at the end (vm).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.vm.agent_client import CHANNEL_BUFFER, AgentClient, OutputTooLarge, _handshake
from ttci.agent import main as guest_agent
from ttci.cli import artifacts, env_files
from ttci.cli.artifacts import UnsafeArchive, extract_b64, extract_requested, fresh_dir
from ttci.cli.job_plan import JobSpec, Outcome, parse_targets
from ttci.cli.job_runner import Job
from ttci.cli.main import main
from ttci.model.errors import AgentError, BadInput
from ttci.wire.agent_protocol import (
    CONTROL,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Decoder,
    Frame,
    MsgType,
    encode,
    encode_json,
)

TOKEN = "a1" * 16
MiB = 1 << 20


# -- a fake guest: answers HELLO, then does what a test tells it ---------------------------------
class FakeGuest:
    """The guest end of a socketpair. on_frame(guest, frame) runs for each frame after HELLO."""

    def __init__(self, on_frame: Callable[[FakeGuest, Frame], None]) -> None:
        self.host, self.sock = socket.socketpair()
        self.on_frame = on_frame
        self.seen: list[Frame] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        with self.lock:  # whole frames, whichever thread sends
            self.sock.sendall(data)

    def _serve(self) -> None:
        decoder = Decoder()
        with self.sock:
            while not self.stop.is_set():
                try:
                    data = self.sock.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                for frame in decoder.feed(data):
                    self.seen.append(frame)
                    try:
                        if frame.type is MsgType.HELLO:
                            nonce = frame.json()["nonce"]
                            ok = {"nonce": nonce, "version": PROTOCOL_VERSION}
                            self.send(encode_json(MsgType.HELLO_OK, CONTROL, ok))
                        else:
                            self.on_frame(self, frame)
                    except OSError:
                        return

    def client(self) -> AgentClient:
        return AgentClient(self.host, _handshake(self.host, TOKEN, time.monotonic() + 5))

    def close(self) -> None:
        self.stop.set()
        with contextlib_suppress():
            self.sock.shutdown(socket.SHUT_RDWR)


def contextlib_suppress() -> Any:
    import contextlib

    return contextlib.suppress(OSError)


def _exits_ok(guest: FakeGuest, frame: Frame) -> None:
    """A well-behaved guest: every EXEC prints `ok` and exits 0."""
    if frame.type is MsgType.EXEC:
        guest.send(encode(MsgType.STDOUT, frame.channel, b"ok"))
        guest.send(encode_json(MsgType.EXIT, frame.channel, {"code": 0}))


@pytest.fixture
def other_vm() -> Iterator[AgentClient]:
    """Another VM's session on the same host: it must not notice the hostile one."""
    guest = FakeGuest(_exits_ok)
    client = guest.client()
    yield client
    client.close()
    guest.close()


def _raw(
    mtype: int, channel: int, payload: bytes, *, magic: bytes = MAGIC, version: int = 1
) -> bytes:
    return HEADER.pack(magic, version, mtype, channel, len(payload)) + payload


MALFORMED: dict[str, tuple[Callable[[int], bytes], str]] = {
    "bad magic": (lambda ch: _raw(6, ch, b"x", magic=b"XX"), "bad magic"),
    "bad version": (lambda ch: _raw(6, ch, b"x", version=9), "frame format 9 is not 1"),
    "oversize length": (
        lambda ch: HEADER.pack(MAGIC, 1, 6, ch, MAX_PAYLOAD + 1),
        f"exceeds {MAX_PAYLOAD}",
    ),
    "unknown type": (lambda ch: _raw(99, ch, b""), "unknown message type 99"),
    "EXIT not JSON": (lambda ch: _raw(MsgType.EXIT, ch, b"{nope"), "EXIT payload is not JSON"),
    "EXIT not an object": (lambda ch: _raw(MsgType.EXIT, ch, b"[1]"), "not a JSON object"),
    "EXIT bad field": (
        lambda ch: encode_json(MsgType.EXIT, ch, {"code": "zero"}),
        "exit status code 'zero' is not a whole number",
    ),
    "ERROR not JSON": (lambda ch: _raw(MsgType.ERROR, ch, b"\xff\xfe"), "ERROR payload is not"),
    "output on a channel never opened": (
        lambda ch: encode(MsgType.STDOUT, ch + 1000, b"x"),
        "which was never opened",
    ),
    "EXIT for a channel never opened": (
        lambda ch: encode_json(MsgType.EXIT, ch + 7, {"code": 0}),
        "which was never opened",
    ),
    "a host's message": (lambda ch: encode_json(MsgType.EXEC, ch, {}), "EXEC is the host's"),
    "output on the control channel": (
        lambda ch: encode(MsgType.STDOUT, CONTROL, b"x"),
        "STDOUT on the control channel",
    ),
    "ERROR on the control channel": (
        lambda ch: encode_json(MsgType.ERROR, CONTROL, {"message": "boo"}),
        "the agent reports 'boo'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_frame_ends_only_its_own_session(case: str, other_vm: AgentClient) -> None:
    make, reason = MALFORMED[case]

    def evil(guest: FakeGuest, frame: Frame) -> None:
        if frame.type is MsgType.EXEC:
            guest.send(encode(MsgType.STDOUT, frame.channel, b"partial"))
            guest.send(make(frame.channel))

    guest = FakeGuest(evil)
    client = guest.client()
    got: list[bytes] = []
    try:
        with pytest.raises(AgentError) as e:
            client.exec(["true"], on_stdout=got.append, timeout=5)
        assert "broke the protocol" in e.value.message and reason in e.value.message, e.value
        assert client.closed and reason in client.error
        with pytest.raises(AgentError, match="session with the agent is over"):
            client.exec(["true"])  # a closed session refuses at once, no hang
        # Another VM's session on this host is untouched, during and after.
        assert other_vm.output(["anything"])[1] == b"ok"
    finally:
        client.close()
        guest.close()


def test_late_output_of_a_finished_command_is_dropped_not_fatal() -> None:
    """A background child may write after EXIT: that channel was opened, so it is no attack."""

    def late(guest: FakeGuest, frame: Frame) -> None:
        if frame.type is MsgType.EXEC:
            guest.send(encode_json(MsgType.EXIT, frame.channel, {"code": 0}))
            time.sleep(0.05)
            guest.send(encode(MsgType.STDOUT, frame.channel, b"late"))
            guest.send(encode_json(MsgType.HELLO_OK, CONTROL, {"nonce": "old"}))  # a repeat

    guest = FakeGuest(late)
    client = guest.client()
    try:
        for _ in range(3):
            assert client.exec(["x"]).code == 0
            time.sleep(0.1)
        assert not client.closed, client.error
    finally:
        client.close()
        guest.close()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_stdout_flood_at_a_slow_reader_stays_bounded(other_vm: AgentClient) -> None:
    """The guest sends 192 MiB as fast as it can; the reader takes 10 ms per MiB. The client
    never holds more than CHANNEL_BUFFER + one frame (it stops reading the port: the guest's
    send blocks), and the process's RSS barely moves. Unbounded, it would hold ~all of it."""
    total = 192
    chunk = os.urandom(MAX_PAYLOAD)

    def flood(guest: FakeGuest, frame: Frame) -> None:
        if frame.type is MsgType.EXEC:
            for _ in range(total):
                guest.send(encode(MsgType.STDOUT, frame.channel, chunk))
            guest.send(encode_json(MsgType.EXIT, frame.channel, {"code": 0}))

    guest = FakeGuest(flood)
    client = guest.client()
    peak = [0]
    got = [0]
    rss0 = _rss_mib()
    rss_peak = [rss0]

    def slow(data: bytes) -> None:
        got[0] += len(data)
        peak[0] = max(peak[0], client.buffered)
        if got[0] % (16 * MiB) == 0:
            rss_peak[0] = max(rss_peak[0], _rss_mib())
            assert other_vm.output(["x"])[1] == b"ok"  # the other VM is served meanwhile
        time.sleep(0.01)

    try:
        assert client.exec(["yes"], on_stdout=slow).code == 0
    finally:
        client.close()
        guest.close()
    grown = rss_peak[0] - rss0
    print(
        f"\nflood {total} MiB: client buffered at most {peak[0] / MiB:.1f} MiB "
        f"(bound {(CHANNEL_BUFFER + MAX_PAYLOAD) / MiB:.0f} MiB), RSS +{grown:.0f} MiB"
    )
    assert got[0] == total * MAX_PAYLOAD
    assert peak[0] <= CHANNEL_BUFFER + MAX_PAYLOAD
    assert grown < 48, f"RSS grew {grown:.0f} MiB under the flood"


def test_output_over_max_output_kills_the_command() -> None:
    cancelled: list[dict[str, Any]] = []

    def endless(guest: FakeGuest, frame: Frame) -> None:
        if frame.type is MsgType.EXEC:
            threading.Thread(target=pour, args=(guest, frame.channel), daemon=True).start()
        elif frame.type is MsgType.CANCEL:
            cancelled.append(frame.json())
            guest.send(encode_json(MsgType.EXIT, frame.channel, {"signal": 9}))

    def pour(guest: FakeGuest, channel: int) -> None:
        with contextlib_suppress():
            while not cancelled:
                guest.send(encode(MsgType.STDOUT, channel, b"y" * 65536))

    guest = FakeGuest(endless)
    client = guest.client()
    try:
        with pytest.raises(OutputTooLarge, match="more than 1048576 bytes; it was stopped"):
            client.exec(["yes"], max_output=MiB)
        deadline = time.monotonic() + 5
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cancelled == [{"signal": 9}]
        time.sleep(0.2)
        assert not client.closed  # the session lives on; only the command was stopped
    finally:
        client.close()
        guest.close()


# -- the real guest agent, sent malformed host frames ----------------------------------------------
def _settle(timeout: float = 10.0) -> None:
    """Wait until the commands the agent (a thread of this process) started have ended, and
    their output pumps and exit reports are done, so a test's hang-up breaks no pipe."""
    me = str(os.getpid())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib_suppress():
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if fields[1] == me and fields[0] != "Z":
                    kids.append(stat)
        if not kids:
            break
        time.sleep(0.05)
    time.sleep(0.3)


class RawHost:
    """The host end of a socketpair to the real agent (serve_fd in a thread), frame by frame."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.sock, guest = socket.socketpair()
        self._guest = guest
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=guest_agent.serve_fd, args=(guest.fileno(), token, self.stop), daemon=True
        )
        self.thread.start()
        self.decoder = Decoder()
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self, timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.frames += self.decoder.feed(self.sock.recv(1 << 16))
        return self.frames.pop(0)

    def hello(self, token: str = TOKEN) -> Frame:
        self.send(encode_json(MsgType.HELLO, CONTROL, {"version": 1, "token": token, "nonce": "n"}))
        return self.next()

    def until(self, mtype: MsgType, channel: int) -> list[Frame]:
        out = []
        while True:
            f = self.next(10)
            out.append(f)
            if f.type is mtype and f.channel == channel:
                return out

    def close(self) -> None:
        _settle()
        self.stop.set()
        with contextlib_suppress():
            self.sock.shutdown(socket.SHUT_WR)  # the agent reads EOF, sees stop and returns
        self.thread.join(timeout=5)
        self.sock.close()
        self._guest.close()


@pytest.fixture
def raw() -> Iterator[RawHost]:
    host = RawHost()
    yield host
    host.close()


BAD_HELLOS = [
    b"not json",
    b"[1, 2]",
    b'"a string"',
    json.dumps({"version": 1, "token": TOKEN, "time": 1e308}).encode(),
    json.dumps({"version": 1, "token": TOKEN, "time": "noon"}).encode(),
    json.dumps({"version": "1", "token": TOKEN}).encode(),
    json.dumps({"version": 1, "token": ["a"]}).encode(),
    b'{"version": 1, "token": "' + TOKEN.encode() + b'", "time": Infinity}',
]


def test_bad_hellos_are_refused_and_the_agent_keeps_serving(raw: RawHost) -> None:
    answers = []
    for body in BAD_HELLOS:
        raw.send(encode(MsgType.HELLO, CONTROL, body))
        answers.append(raw.next())
    # A far-off or odd clock is ignored, not fatal: those HELLOs are fine sessions.
    kinds = [f.type.name for f in answers]
    assert kinds[:3] == ["ERROR"] * 3 and kinds[5:7] == ["ERROR", "ERROR"], kinds
    assert "not JSON" in answers[0].json()["message"]
    assert raw.thread.is_alive()
    assert raw.hello().type is MsgType.HELLO_OK


BAD_AFTER_HELLO: list[tuple[MsgType, bytes, str]] = [
    (MsgType.EXEC, b"{", "not JSON"),
    (MsgType.EXEC, json.dumps({"argv": "ls"}).encode(), "argv must be"),
    (MsgType.EXEC, json.dumps({"argv": ["true"], "env": [1]}).encode(), "env must be"),
    (MsgType.EXEC, json.dumps({"argv": ["true"], "timeout": "x"}).encode(), "timeout must be"),
    (MsgType.EXEC, json.dumps({"argv": ["true"], "cwd": 5}).encode(), ""),
    (MsgType.EXEC, json.dumps({"argv": ["a\x00b"]}).encode(), ""),
    (MsgType.IDENTITY, b"{}", "identity version"),
    (MsgType.IDENTITY, b"nope", "not JSON"),
    (MsgType.PONG, b"{}", "unexpected PONG"),
    (MsgType.STDOUT, b"x", "unexpected STDOUT"),
]


@pytest.mark.parametrize(("mtype", "body", "words"), BAD_AFTER_HELLO)
def test_bad_requests_are_refused_and_the_agent_keeps_serving(
    raw: RawHost, mtype: MsgType, body: bytes, words: str
) -> None:
    assert raw.hello().type is MsgType.HELLO_OK
    raw.send(encode(mtype, 5, body))
    answer = raw.next()
    assert answer.type is MsgType.ERROR and answer.channel == 5
    assert words in answer.json()["message"]
    raw.send(encode_json(MsgType.EXEC, 6, {"argv": ["echo", "alive"], "stdin": False}))
    frames = raw.until(MsgType.EXIT, 6)
    assert b"alive\n" in b"".join(f.payload for f in frames if f.type is MsgType.STDOUT)


@pytest.mark.parametrize("sig", ["TERM", 3.5, [9], -1, 999, True, {"a": 1}])
def test_cancel_with_a_bad_signal_is_refused_and_the_command_runs_on(
    raw: RawHost, sig: object
) -> None:
    assert raw.hello().type is MsgType.HELLO_OK
    raw.send(encode_json(MsgType.EXEC, 3, {"argv": ["sh", "-c", "sleep 0.5; echo done"]}))
    raw.send(encode(MsgType.CANCEL, 3, json.dumps({"signal": sig}).encode()))
    frames = raw.until(MsgType.EXIT, 3)
    errors = [f for f in frames if f.type is MsgType.ERROR]
    assert errors and "is not a signal number" in errors[0].json()["message"]
    assert frames[-1].json()["code"] == 0 and not frames[-1].json()["cancelled"]
    assert b"done" in b"".join(f.payload for f in frames if f.type is MsgType.STDOUT)
    raw.send(encode(MsgType.CANCEL, 4, b"not json"))  # no such command: ignored, no answer
    raw.send(encode_json(MsgType.PING, 7, {}))
    assert raw.next().type is MsgType.PONG


def test_garbage_and_a_cancel_flood_do_not_stop_the_agent(raw: RawHost) -> None:
    raw.send(b"XXXXXXXXXXXXXXXX")  # bad magic
    assert "bad magic" in raw.next().json()["message"]
    raw.send(struct.pack(">2sBBII", MAGIC, 1, 99, 0, 0))  # unknown type
    assert "unknown message type" in raw.next().json()["message"]
    raw.send(struct.pack(">2sBBII", MAGIC, 1, 4, 1, MAX_PAYLOAD + 5))  # oversize
    assert "exceeds" in raw.next().json()["message"]
    assert raw.hello().type is MsgType.HELLO_OK
    raw.send(encode_json(MsgType.EXEC, 2, {"argv": ["sleep", "30"]}))
    threads = threading.active_count()
    raw.send(b"".join(encode_json(MsgType.CANCEL, 2, {"signal": 15}) for _ in range(2000)))
    frames = raw.until(MsgType.EXIT, 2)
    assert frames[-1].json()["cancelled"] is True
    assert threading.active_count() < threads + 20  # one kill timer, not 2,000
    assert raw.thread.is_alive()


def test_the_credential_comes_with_the_first_hello_only() -> None:
    """No token at boot (none on the kernel command line): the first HELLO sets it."""
    host = RawHost(token=None)
    try:
        first = host.hello("first-" + TOKEN)
        assert first.type is MsgType.HELLO_OK and first.json()["provisioned"] is True
        assert host.hello("other").json()["message"] == "bad token"
        assert host.hello("").json()["message"] == "bad token"
        again = host.hello("first-" + TOKEN)
        assert again.type is MsgType.HELLO_OK and again.json()["provisioned"] is False
    finally:
        host.close()


# -- the extractors ------------------------------------------------------------------------------
def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


ATTACK = _tar(
    _file("report.txt", b"results\n"),
    _file(".git/hooks/post-checkout", b"#!/bin/sh\ntouch /tmp/pwned\n", 0o755),
    _file("Jenkinsfile", b"pipeline { }\n"),
)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "the documented attack": (ATTACK, "'.git/hooks/post-checkout', which was not requested"),
    "a sibling nobody asked for": (
        _tar(_file("report.txt"), _file("other.txt")),
        "not requested",
    ),
    "a symlink": (
        _tar(_special("report.txt", tarfile.SYMTYPE, "/etc/passwd")),
        "a link (to '/etc/passwd')",
    ),
    "a symlink inside a directory": (
        _tar(_special("report.txt/x", tarfile.SYMTYPE, "../../../.bashrc")),
        "a link",
    ),
    "a hard link": (
        _tar(_file("report.txt/a"), _special("report.txt/b", tarfile.LNKTYPE, "report.txt/a")),
        "a link",
    ),
    "a character device": (
        _tar(_special("report.txt", tarfile.CHRTYPE)),
        "a device, FIFO or other special file",
    ),
    "a block device": (_tar(_special("report.txt", tarfile.BLKTYPE)), "a device"),
    "a FIFO": (_tar(_special("report.txt", tarfile.FIFOTYPE)), "FIFO"),
    "an absolute path": (_tar(_file("/etc/cron.d/x")), "an absolute or empty path"),
    "a climbing path": (_tar(_file("report.txt/../../x")), "climbs out with .."),
    "a bare climbing path": (_tar(_file("../report.txt")), "climbs out with .."),
    "too much": (_tar(_file("report.txt", b"x" * 5000)), "more than 4096 bytes"),
    "not a tar": (b"MZ" + os.urandom(2000), "not a usable tar archive"),
    "compressed": (__import__("gzip").compress(_tar(_file("report.txt"))), "not a usable tar"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_whole(case: str, tmp_path: Path) -> None:
    data, words = HOSTILE[case]
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive) as e:
        extract_requested(data, dest, "report.txt", 4096)
    assert words in e.value.message, e.value.message
    assert not dest.exists()  # nothing at all was written
    assert not (tmp_path / "x").exists() and not Path("/tmp/pwned").exists()


def test_the_requested_file_or_directory_is_unpacked_with_safe_modes(tmp_path: Path) -> None:
    d = tarfile.TarInfo("logs")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    data = _tar((d, None), _file("logs/a.log", b"a\n"), _file("logs/run", b"#!", 0o4777))
    extract_requested(data, tmp_path / "got", "logs", 1 << 20)
    assert (tmp_path / "got" / "logs" / "a.log").read_text() == "a\n"
    assert (tmp_path / "got" / "logs" / "run").stat().st_mode & 0o7777 == 0o755  # no setuid
    # `/` asked for: anything relative goes (still no links), under DEST only.
    extract_requested(_tar(_file("./etc/x"), _file("y")), tmp_path / "all", ".", 1 << 20)
    assert (tmp_path / "all" / "etc" / "x").exists() and (tmp_path / "all" / "y").exists()


def test_a_link_already_in_the_destination_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "logs").symlink_to(outside)
    with pytest.raises(UnsafeArchive, match="refused to unpack"):
        extract_requested(_tar(_file("logs/a.log")), dest, "logs", 1 << 20)
    assert list(outside.iterdir()) == []


def test_base64_that_is_not(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive, match="not base64"):
        extract_b64("@@@", tmp_path / "x", "a")


def test_files_land_in_a_new_or_empty_directory(tmp_path: Path) -> None:
    fresh_dir(tmp_path / "new", False, "DEST")
    (tmp_path / "empty").mkdir()
    fresh_dir(tmp_path / "empty", False, "DEST")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".git").mkdir()
    with pytest.raises(BadInput, match="is not empty"):
        fresh_dir(tmp_path / "full", False, "--artifact-dir")
    fresh_dir(tmp_path / "full", True, "--artifact-dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        fresh_dir(tmp_path / "file", True, "DEST")


def test_the_client_cap_comes_from_tt_max_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TT_MAX_FILES", raising=False)
    assert artifacts.max_files() == 1 << 30
    monkeypatch.setenv("TT_MAX_FILES", "4G")
    assert artifacts.max_files() == 4 << 30
    monkeypatch.setenv("TT_MAX_FILES", "lots")
    with pytest.raises(BadInput, match="TT_MAX_FILES"):
        artifacts.max_files()


# -- tt env get and tt job run with a hostile guest ----------------------------------------------
class _Scheduler:
    """What tt env get / tt job run ask of the client; every VM answers with `tar`."""

    def __init__(self, tar: bytes, vms: tuple[str, ...] = ("vm-1",)) -> None:
        self.data = base64.b64encode(tar).decode()
        self.vms = vms
        self.results: list[str] = []
        self.limits: list[int] = []

    def get_files(self, name: str, path: str, limit: int) -> list[dict[str, Any]]:
        self.limits.append(limit)
        return [{"vm": vm, "ok": True, "data": self.data} for vm in self.vms]

    def report_result(self, name: str, result: Any) -> dict[str, Any]:
        self.results.append(result.result)
        return {}

    def delete_env_wait(self, name: str, wait: float, commit_cache: bool = False) -> bool:
        return True


def test_env_get_refuses_the_attack_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(env_files, "_client", lambda: _Scheduler(ATTACK))
    dest = tmp_path / "got"
    assert main(["env", "get", "e", "/root/work/report.txt", str(dest)]) == 1
    out = capsys.readouterr()
    assert "[vm-1] refused to unpack: the guest's archive holds '.git/hooks/post-checkout'" in (
        out.out
    )
    assert "Traceback" not in out.err
    assert not (dest / "vm-1").exists()


def test_env_get_names_vm_folders_safely_and_wants_a_fresh_dest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _tar(_file("report.txt", b"r\n"))
    monkeypatch.setattr(env_files, "_client", lambda: _Scheduler(good, ("a", "..", "b/c")))
    dest = tmp_path / "got"
    assert main(["env", "get", "e", "/x/report.txt", str(dest), "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in got] == [True, False, False]
    assert (dest / "a" / "report.txt").read_text() == "r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got"]
    # DEST is not empty now: refused before anything is asked (2), unless --overwrite.
    assert main(["env", "get", "e", "/x/report.txt", str(dest)]) == 2
    assert "is not empty" in capsys.readouterr().err
    monkeypatch.setattr(env_files, "_client", lambda: _Scheduler(good, ("a",)))
    assert main(["env", "get", "e", "/x/report.txt", str(dest), "--overwrite"]) == 0


def _job(tmp_path: Path, client: _Scheduler, artifacts_: list[str]) -> tuple[Job, Outcome]:
    spec = JobSpec(
        targets=parse_targets("debian-12", "amd64"),
        argv=["true"],
        cpus=1,
        memory_mib=512,
        disk_gib=0,
        timeout_s=60,
        artifacts=artifacts_,
        artifact_dir=tmp_path / "tt-artifacts",
        upload=lambda: None,
        script=None,
        quiet=False,
        max_bytes=1 << 20,
    )
    job = Job(spec, client, {})  # type: ignore[arg-type]
    [t] = spec.targets
    o = job.outcomes[t]
    o.code = 0
    job._fetch(t, o)
    job._finish(t, o)
    return job, o


def test_job_run_refuses_the_attack_as_an_error_not_a_cancel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _Scheduler(ATTACK)
    _, o = _job(tmp_path, client, ["out/report.txt"])
    assert "artifact out/report.txt refused" in o.error and "post-checkout" in o.error
    assert client.results == ["error"]  # not "cancelled"
    assert client.limits == [1 << 20]
    assert not (tmp_path / "tt-artifacts").exists()
    assert not (tmp_path / ".git").exists() and not (tmp_path / "Jenkinsfile").exists()
    assert "refused" in capsys.readouterr().err


def test_job_run_takes_the_requested_artifact_into_tt_artifacts(tmp_path: Path) -> None:
    client = _Scheduler(_tar(_file("report.txt", b"r\n")))
    _, o = _job(tmp_path, client, ["out/report.txt"])
    assert o.error == "" and client.results == ["success"]
    assert (tmp_path / "tt-artifacts" / "out" / "report.txt").read_text() == "r\n"


def test_job_run_wants_a_fresh_artifact_dir_before_any_vm(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "tt-artifacts").mkdir()
    (tmp_path / "tt-artifacts" / "old").write_text("x")
    args = ["--os", "debian-12", "--arch", "amd64", "--artifact", "a", "--", "true"]
    env = {**os.environ, "TT_CONFIG": str(tmp_path / "none.json")}
    code = "import sys; from ttci.cli.main import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "job", "run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    assert "tt-artifacts is not empty" in r.stderr and "--overwrite" in r.stderr
    r = subprocess.run(
        [sys.executable, "-c", code, "job", "run", "--overwrite", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "no scheduler configured" in r.stderr  # got past the check


# -- hostd's push and get, through its app, against the real agent on this machine ---------------
class _Mgr:
    """The part of VMManager the files routes use, with the real agent as the 'VM'."""

    def __init__(self, agent: AgentClient) -> None:
        self._agent = agent

    def get(self, vm_id: str) -> dict[str, Any]:
        return {"id": vm_id}

    def exec(self, vm_id: str, argv: list[str], **kw: Any) -> Any:
        return self._agent.exec(argv, **kw)


@pytest.fixture
def hostd_files() -> Iterator[Any]:
    from hostd.service.api import create_app

    host, guest = socket.socketpair()
    stop = threading.Event()
    served = threading.Thread(
        target=guest_agent.serve_fd, args=(guest.fileno(), TOKEN, stop), daemon=True
    )
    served.start()
    agent = AgentClient(host, _handshake(host, TOKEN, time.monotonic() + 10))
    app = create_app(_Mgr(agent), "hostd-token", max_files=MiB)  # type: ignore[arg-type]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = "Bearer hostd-token"
    yield client
    _settle()  # the agent's commands end and report before the host hangs up
    stop.set()
    agent.close()
    served.join(timeout=5)
    guest.close()


def test_hostd_get_is_capped_while_it_streams(hostd_files: Any, tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"s" * 1000)
    (tmp_path / "big").write_bytes(os.urandom(3 * MiB))
    r = hostd_files.get(f"/v1/vms/v/files?path={tmp_path}/small")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        assert tar.getnames() == ["small"]
    r = hostd_files.get(f"/v1/vms/v/files?path={tmp_path}/big")
    assert r.status_code == 400 and "over this host's limit of 1048576 bytes" in r.json["error"]


def test_hostd_get_passes_the_name_after_dashes(hostd_files: Any, tmp_path: Path) -> None:
    """Without `--`, tar would take a file named --version as its option (and answer junk)."""
    (tmp_path / "--version").write_text("v")
    r = hostd_files.get(f"/v1/vms/v/files?path={tmp_path}/--version")
    assert r.status_code == 200, r.json
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        assert tar.getnames() == ["--version"]


def test_hostd_get_follows_links_in_the_guest_so_none_come_back(
    hostd_files: Any, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("a")
    os.link(d / "a", d / "hard")
    (d / "soft").symlink_to("a")
    r = hostd_files.get(f"/v1/vms/v/files?path={d}")
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        assert all(m.isreg() or m.isdir() for m in tar.getmembers())
    extract_requested(r.data, tmp_path / "got", "d", MiB)
    assert (tmp_path / "got" / "d" / "soft").read_text() == "a"


def test_hostd_push_streams_within_its_cap(hostd_files: Any, tmp_path: Path) -> None:
    ok = _tar(_file("f.txt", b"pushed"))
    r = hostd_files.put(f"/v1/vms/v/files?dest={tmp_path}/in", data=ok)
    assert r.status_code == 200 and r.json["bytes"] == len(ok)
    assert (tmp_path / "in" / "f.txt").read_text() == "pushed"
    big = _tar(_file("big", os.urandom(2 * MiB)))
    r = hostd_files.put(f"/v1/vms/v/files?dest={tmp_path}/big", data=big)
    assert r.status_code == 413  # by Content-Length, before a byte is read
    r = hostd_files.put(
        f"/v1/vms/v/files?dest={tmp_path}/big2",
        input_stream=io.BytesIO(big),
        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
    )
    assert r.status_code == 413 and "over this route's 1048576 bytes" in r.json["error"]
    assert not (tmp_path / "big2" / "big").exists() or (
        tmp_path / "big2" / "big"
    ).stat().st_size < (2 * MiB)


def test_hostd_exec_stream_at_a_slow_reader_stays_bounded() -> None:
    """hostd's real app under waitress, the real agent running `head -c 256M /dev/zero` as the
    'guest', and an HTTP client reading the exec stream at ~100 MiB/s: hostd stops reading
    the guest's port while its queues are full, so this process
    (hostd, the agent and the reader together) grows by a bounded amount, not by 256 MiB."""
    import requests
    import waitress

    from hostd.service.api import create_app
    from ttci.wire.commands import ExecRequest

    class Mgr(_Mgr):
        def agent(self, vm_id: str) -> AgentClient:
            return self._agent

    host, guest = socket.socketpair()
    stop = threading.Event()
    served = threading.Thread(
        target=guest_agent.serve_fd, args=(guest.fileno(), TOKEN, stop), daemon=True
    )
    served.start()
    agent = AgentClient(host, _handshake(host, TOKEN, time.monotonic() + 10))
    app = create_app(Mgr(agent), "hostd-token")  # type: ignore[arg-type]
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}/v1/vms/v/exec"
    total = 256 * MiB
    body = ExecRequest(("head", "-c", str(total), "/dev/zero")).to_dict()
    got, rss0 = 0, _rss_mib()
    peak = rss0
    try:
        with requests.post(
            url, json=body, headers={"Authorization": "Bearer hostd-token"}, stream=True, timeout=60
        ) as r:
            for line in r.iter_lines(chunk_size=1 << 16):
                ev = json.loads(line)
                if ev["event"] == "stdout":
                    before, got = got, got + len(base64.b64decode(ev["data"]))
                    if got // (4 * MiB) > before // (4 * MiB):  # ~100 MiB/s at most
                        peak = max(peak, _rss_mib())
                        time.sleep(0.04)
    finally:
        server.close()
        _settle()
        stop.set()
        agent.close()
        served.join(timeout=5)
        guest.close()
    print(f"\nhostd exec stream, {total // MiB} MiB at a slow reader: RSS +{peak - rss0:.0f} MiB")
    assert got == total
    assert peak - rss0 < 96


def test_the_scheduler_under_a_guest_flood_at_a_slow_client_stays_bounded(tmp_path: Path) -> None:
    """A host (a stand-in under waitress) streams 256 MiB of a guest's stdout as fast as it can;
    the scheduler's exec stream is read by a client taking ~40 MiB/s. The scheduler queues 32
    events (1 MiB each at most) and then stops reading the host, so it grows by a bounded
    amount (this process: the scheduler and its reader), not by 256 MiB."""
    import waitress
    from flask import Flask, Response

    from tests.admin_fake import HOST_TOKEN, fake_scheduler
    from ttci.wire.api import API_VERSION
    from ttci.wire.commands import ExecRequest
    from ttci.wire.hosts import HostRegistration

    total = 256 * MiB
    line = json.dumps({"event": "stdout", "data": base64.b64encode(b"y" * MiB).decode()})
    host = Flask("flooding-host")

    @host.post("/v1/vms/<vm_id>/exec")
    def exec_vm(vm_id: str) -> Response:
        def pour() -> Iterator[str]:
            yield json.dumps({"event": "start"}) + "\n"
            for _ in range(total // MiB):
                yield line + "\n"
            yield json.dumps({"event": "exit", "code": 0}) + "\n"

        return Response(pour(), mimetype="application/x-ndjson")

    server = waitress.create_server(host, host="127.0.0.1", port=0, threads=2)
    threading.Thread(target=server.run, daemon=True).start()
    s = fake_scheduler(tmp_path / "sched", "admin-" + "a" * 30, vms=1, hosts=1, jobs=0)
    s.pool.register(
        HostRegistration.from_dict(
            {
                "id": "fake-0",
                "url": f"http://127.0.0.1:{server.effective_port}",
                "api": API_VERSION,
                "token": HOST_TOKEN,
                "info": {
                    "machine": "x86_64",
                    "accel": "tcg",
                    "total": {"cpus": 64, "memory_mib": 262144, "disk_gib": 2000},
                    "used": {"cpus": 1, "memory_mib": 512, "disk_gib": 0},
                    "free": {"cpus": 63, "memory_mib": 261632, "disk_gib": 2000},
                    "vms": 1,
                    "images": [{"name": "qemu:debian-12:amd64", "arch": "amd64"}],
                },
            }
        )
    )
    user = s.users.resolve("admin-" + "a" * 30)
    assert user is not None
    got, rss0 = 0, _rss_mib()
    peak = rss0
    try:
        for ev in s.exec("ci-00000", user, ExecRequest(("yes",))):
            if ev.data:
                before, got = got, got + len(ev.data)
                if got // (4 * MiB) > before // (4 * MiB):  # ~40 MiB/s at most
                    peak = max(peak, _rss_mib())
                    time.sleep(0.1)
    finally:
        server.close()
    print(
        f"\nscheduler exec stream, {total // MiB} MiB at a slow client: RSS +{peak - rss0:.0f} MiB"
    )
    assert got == total
    assert peak - rss0 < 100  # 32 MiB of queue, the host's buffers; unbounded: ~175


def test_the_bounds_quoted_in_the_report() -> None:
    """Per command: CHANNEL_BUFFER + one frame in the agent client, EXEC_QUEUE frames in an
    exec stream's queue; per session one frame being decoded and one read."""
    assert 4 * MiB == CHANNEL_BUFFER and MiB == MAX_PAYLOAD
    from hostd.service.api import EXEC_QUEUE

    assert 16 * MiB >= EXEC_QUEUE * MAX_PAYLOAD


# -- the scheduler's and tt's reads of a get: capped as they stream --------------------------------
@pytest.fixture
def endless_server() -> Iterator[tuple[str, list[int]]]:
    """An HTTP server on loopback whose every GET answers 200 with bytes that never end (it
    counts what it managed to send before the reader hung up)."""
    import http.server

    sent = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            block = b"[" + b"A" * 65535
            with contextlib_suppress():
                while sent[0] < 512 * MiB:
                    self.wfile.write(block)
                    sent[0] += len(block)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", sent
    server.shutdown()
    server.server_close()


def test_the_scheduler_reads_a_hosts_get_no_further_than_its_cap(
    endless_server: tuple[str, list[int]],
) -> None:
    from ttci.scheduler.hostd_client import HostdClient

    addr, sent = endless_server
    with pytest.raises(BadInput, match="over the scheduler's limit of 2097152 bytes"):
        HostdClient("h", f"http://{addr}", "t").get("vm", "/big", 2 * MiB)
    time.sleep(0.2)
    assert sent[0] < 64 * MiB  # it stopped reading (the server's writes then failed)


def test_tt_reads_a_get_no_further_than_its_cap(endless_server: tuple[str, list[int]]) -> None:
    from ttci.client.config import ClientConfig
    from ttci.client.scheduler import Client
    from ttci.model.errors import TTError

    addr, sent = endless_server
    with pytest.raises(TTError, match="over tt's limit of 1048576 bytes"):
        Client(ClientConfig(addr, "t")).get_files("e", "/big", MiB)
    time.sleep(0.2)
    assert sent[0] < 64 * MiB


# -- a real VM: no credential where another local user can read it --------------------------------
def _open_to_others(path: Path, root: Path) -> bool:
    """Whether another local user could read path: the file readable by group or others and
    every folder from root (where a daemon's state lives) down to it open to them too."""
    try:
        if not path.stat().st_mode & 0o044:
            return False
        return all(
            d.stat().st_mode & 0o011 for d in [root, *path.parents] if d.is_relative_to(root)
        )
    except OSError:
        return False


def _holders(roots: list[Path], secrets_: dict[str, str]) -> list[tuple[str, Path]]:
    """(which secret, file) for every file under roots holding one."""
    found = []
    for root in roots:
        if not root.exists():
            continue
        # os.walk skips folders that vanish while it runs (hostd removes self-test files).
        walked = (Path(d) / f for d, _, files in os.walk(root) for f in files)
        for p in [root] if root.is_file() else walked:
            if not p.is_file() or p.is_symlink() or p.is_socket():
                continue
            with contextlib_suppress():
                data = p.read_bytes()
                found += [(what, p) for what, s in secrets_.items() if s.encode() in data]
    return found


def _process_lists(secrets_: dict[str, str]) -> list[str]:
    """Secrets on any process's command line (what `ps -eo args` shows every user)."""
    import subprocess

    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    found = [f"ps: {what}" for what, s in secrets_.items() if s in ps]
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib_suppress():
            cmd = (d / "cmdline").read_bytes()
            found += [f"pid {d.name}: {w}" for w, s in secrets_.items() if s.encode() in cmd]
    return found


@pytest.mark.vm
@pytest.mark.e2e
def _scan(state: Path, user_token: str, found: list[str], held: set[str]) -> dict[str, str]:
    """One look at the host: every agent token hostd holds (VMs, templates) and the user's,
    on process command lines and in files other users could read (found), and where root
    alone can read them (held). Returns the tokens."""
    import contextlib
    import sqlite3

    from tests.cloudutil import hostd_state

    with contextlib.closing(sqlite3.connect(hostd_state(state) / "hostd.db", timeout=30)) as db:
        rows = db.execute("select name, token from vms").fetchall()
        rows += db.execute("select id, token from templates").fetchall()
    tokens = {f"agent token of {n}": str(t) for n, t in rows if t}
    tokens["user token"] = user_token
    found += _process_lists(tokens)
    where = [state, Path("/run/libvirt"), Path("/var/log/libvirt"), Path("/etc/libvirt")]
    for what, p in _holders(where, tokens):
        root = next(r for r in where if p.is_relative_to(r))
        # In the test's own folder (0700) judge from its children down, as for a state dir an
        # operator keeps in /var/lib (0755).
        top = state / p.relative_to(state).parts[0] if root == state else root
        if _open_to_others(p, top):
            found.append(f"{p}: {what}")
        else:  # the databases (0600), the client config (0600), a template's memory
            try:
                mode = p.stat().st_mode
            except FileNotFoundError:  # hostd removed it meanwhile (a self-test's save file)
                continue
            held.add(f"{p.relative_to(root)} ({oct(mode & 0o777)})")
    return tokens


@pytest.mark.vm
@pytest.mark.e2e
def test_no_credential_is_visible_during_a_real_vm_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`tt up`'s stack boots a real VM cold (hostd makes its warm-start template behind it),
    then a second one warm from that template (IDENTITY gives it its token); while they run
    commands, no agent token and no user token is on any process's command line, in any file
    another local user could read, in libvirt's domain XML or logs, or on the guests' own
    kernel command line. Only 0600 files in hostd's 0700 state dir hold them."""
    import sqlite3

    from tests.cloudutil import configure_client, free_port, hostd_state, leftovers, tt
    from tests.conftest import IMAGE_PATH, built_image
    from ttci.cli.allinone import running

    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("secrets-vm")
    cfg = state / "client.json"
    found: list[str] = []
    held: set[str] = set()
    rounds = 0
    with running(
        state,
        IMAGE_PATH,
        scheduler_listen=f"127.0.0.1:{free_port()}",
        hostd_listen=f"127.0.0.1:{free_port()}",
        cpu_total=2,
        mem_total=1536,
    ) as stack:
        configure_client(stack.scheduler, stack.token, cfg)
        db = hostd_state(state) / "hostd.db"
        for env in ("sec", "sec2"):
            r = tt(
                "env", "add", env, "--os-prefix", "debian-12:amd64", "--memory", "384", config=cfg
            )
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:  # again and again while VMs and a template run
                tokens = _scan(state, stack.token, found, held)
                rounds += 1
                r = tt("env", "run", env, "--cmd", "cat /proc/cmdline", config=cfg)
                assert r.returncode == 0, r.stderr
                assert "tt.hostname=" in r.stdout
                found += [f"{env} cmdline: {w}" for w, s in tokens.items() if s in r.stdout]
                with sqlite3.connect(db, timeout=30) as conn:
                    ready = conn.execute("select 1 from templates where state = 'ready'").fetchall()
                if rounds >= 10 and (ready or env == "sec2"):
                    break  # the second ENV is made once a template is ready: a warm start
                time.sleep(2)
        starts = re.findall(r"VM (\S+) up in \S+ s \((\w+)", (state / "hostd.log").read_text())
        for env in ("sec", "sec2"):
            assert tt("env", "del", env, config=cfg).returncode == 0
    print(f"\nsecrets scan: {rounds} rounds, VM starts {starts}, found {found}")
    print(f"held where only root reads: {sorted(held)}")
    assert found == []
    assert [kind for _, kind in starts] == ["cold", "warm"], starts
    assert leftovers(state) == []
