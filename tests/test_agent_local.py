"""The real guest agent, served on one end of a socketpair on this host, driven by the real client.

Fast checks of exec semantics; the same code runs inside every VM (tests/test_images_vm.py).
"""

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from hostd.vm.agent_client import AgentClient, _handshake
from ttci.agent import main as guest_agent
from ttci.model.errors import AgentError
from ttci.wire.agent_protocol import PROTOCOL_VERSION

TOKEN = "s3cret-token"


@pytest.fixture
def agent() -> Iterator[AgentClient]:
    host, guest = socket.socketpair()
    stop = threading.Event()
    t = threading.Thread(
        target=guest_agent.serve_fd, args=(guest.fileno(), TOKEN, stop), daemon=True
    )
    t.start()
    client = AgentClient(host, _handshake(host, TOKEN, time.monotonic() + 10))
    yield client
    stop.set()
    client.close()
    guest.close()


def test_hello_reports_the_machine(agent: AgentClient) -> None:
    assert agent.hello["machine"] == os.uname().machine
    assert agent.hello["version"] == PROTOCOL_VERSION == 2  # negotiated: both speak 2


def test_stdout_and_stderr_stay_apart_and_exit_code_comes_back(agent: AgentClient) -> None:
    status, out, err = agent.output(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (status.code, out, err) == (3, b"out\n", b"err\n")


def test_output_streams_before_the_command_ends(agent: AgentClient) -> None:
    seen: list[float] = []
    t0 = time.monotonic()
    agent.exec(
        ["sh", "-c", "echo first; sleep 1; echo second"],
        on_stdout=lambda b: seen.append(time.monotonic() - t0),
    )
    assert len(seen) == 2
    assert seen[0] < 0.8 <= seen[1]


def test_env_cwd_and_stdin(agent: AgentClient) -> None:
    status, out, _ = agent.output(
        ["sh", "-c", 'pwd; echo "$GREETING"; cat'],
        env={"GREETING": "héllo wörld", "PATH": os.environ["PATH"]},
        cwd="/tmp",
        stdin=b"from stdin\n",
    )
    assert status.ok
    assert out.decode() == "/tmp\nhéllo wörld\nfrom stdin\n"


def test_killed_by_signal(agent: AgentClient) -> None:
    status, _, _ = agent.output(["sh", "-c", "kill -9 $$"])
    assert status.code is None and status.signal == 9


def test_timeout_kills_the_process_group(agent: AgentClient) -> None:
    t0 = time.monotonic()
    status, _, _ = agent.output(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert status.timed_out
    assert time.monotonic() - t0 < 5


def test_binary_output_and_large_volume(agent: AgentClient) -> None:
    status, out, _ = agent.output(["head", "-c", "3000000", "/dev/urandom"])
    assert status.ok and len(out) == 3_000_000


def test_commands_run_concurrently(agent: AgentClient) -> None:
    results: list[int | None] = []

    def one() -> None:
        results.append(agent.output(["sleep", "1"])[0].code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]
    assert time.monotonic() - t0 < 3


def test_missing_program_is_a_clear_error(agent: AgentClient) -> None:
    with pytest.raises(AgentError, match="no-such-program"):
        agent.output(["no-such-program"])


def test_wrong_token_is_refused() -> None:
    host, guest = socket.socketpair()
    stop = threading.Event()
    threading.Thread(
        target=guest_agent.serve_fd, args=(guest.fileno(), TOKEN, stop), daemon=True
    ).start()
    try:
        with pytest.raises(AgentError, match="bad token"):
            _handshake(host, "wrong", time.monotonic() + 5)
    finally:
        stop.set()
        host.close()
        guest.close()


def test_find_port_by_name(tmp_path: "os.PathLike[str]") -> None:
    base = os.fspath(tmp_path)
    for dev, name in (("vport0p1", "org.other"), ("vport1p1", "org.ttci.agent.0")):
        os.makedirs(os.path.join(base, dev))
        with open(os.path.join(base, dev, "name"), "w") as f:
            f.write(name + "\n")
    assert guest_agent.find_port(sys_dir=base) == "/dev/vport1p1"
    assert guest_agent.find_port("absent", sys_dir=base) is None


def test_cancel_stops_a_running_command(agent: AgentClient) -> None:
    channels: list[int] = []
    timer = threading.Timer(0.5, lambda: agent.cancel(channels[0]))
    timer.start()
    t0 = time.monotonic()
    status = agent.exec(["sh", "-c", "sleep 30; echo never"], on_start=channels.append)
    assert status.cancelled and status.signal == 15
    assert time.monotonic() - t0 < 5


def test_background_child_does_not_hold_the_command_open(agent: AgentClient) -> None:
    t0 = time.monotonic()
    status, out, _ = agent.output(["sh", "-c", "sleep 20 & echo started"])
    assert status.ok and out == b"started\n"
    assert time.monotonic() - t0 < 6


def test_unread_stdin_does_not_block_other_commands(agent: AgentClient) -> None:
    done: list[int | None] = []
    t = threading.Thread(
        target=lambda: done.append(
            agent.output(["sh", "-c", "sleep 2"], stdin=b"x" * 300_000)[0].code
        ),
        daemon=True,
    )
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert agent.output(["echo", "still here"])[1] == b"still here\n"
    assert time.monotonic() - t0 < 1.5
    t.join(timeout=10)
    assert done == [0]


def test_bad_timeout_is_refused(agent: AgentClient) -> None:
    with pytest.raises(AgentError, match="timeout must be a positive number"):
        agent.output(["true"], timeout="5")  # type: ignore[arg-type]
