"""`tt env add` in the admission queue, against a stand-in client (no scheduler, no VM): the
wait flags, the live position, Ctrl-C taking the request back, and how `tt env list/show` word a
queued ENV. The real queue is exercised in test_jobrun.py and test_gitlab_vm.py."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ttci.cli import env_cmd
from ttci.cli.env_wait import queue_lines, state_text, wait_options
from ttci.cli.main import main, make_parser
from ttci.model.errors import ApiError, BadInput
from ttci.model.resources import Resources
from ttci.wire.envs import EnvRequest, VmUp
from ttci.wire.queue import QueueInfo, WaitOptions

ENV = {
    "name": "ci-1",
    "owner": "alice",
    "state": "ready",
    "os_prefix": "qemu:debian-12:amd64",
    "expires_at": "2030-01-01T00:00:00+00:00",
    "vm_count": 0,
    "lost": 0,
    "vms": [],
}


def _info(position: int, waited: float = 3.0) -> QueueInfo:
    return QueueInfo(
        position, "capacity", "1 CPU free of 4; needs 2", Resources(2, 1024, 4), 1, waited
    )


class FakeClient:
    """What `tt env add` uses of Client; `script` plays the scheduler's progress stream."""

    def __init__(
        self, script: Callable[[FakeClient], None] | None = None, existing: bool = False
    ) -> None:
        self.script = script
        self.existing = existing
        self.waits: list[WaitOptions | None] = []
        self.deleted: list[str] = []
        self.on_queued: Callable[[QueueInfo], None] | None = None
        self.on_granted: Callable[[float], None] | None = None
        self.on_vm: Callable[[VmUp], None] = lambda vm: None

    def show_env(self, name: str) -> dict[str, Any]:
        if not self.existing:
            raise ApiError(f"no ENV {name}", status=404)
        return ENV

    def create_env(self, req: EnvRequest, wait: WaitOptions | None = None) -> dict[str, Any]:
        self.waits.append(wait)
        if self.script:
            self.script(self)
        return {**ENV, "name": req.name}

    def create_env_progress(
        self,
        req: EnvRequest,
        on_vm: Callable[[VmUp], None],
        *,
        on_queued: Callable[[QueueInfo], None] | None = None,
        on_granted: Callable[[float], None] | None = None,
        wait: WaitOptions | None = None,
    ) -> dict[str, Any]:
        self.on_vm, self.on_queued, self.on_granted = on_vm, on_queued, on_granted
        return self.create_env(req, wait)

    def delete_env_wait(self, name: str) -> bool:
        self.deleted.append(name)
        return True

    def get(self, path: str) -> Any:
        queued = {**ENV, "state": "queued", "queue": _info(2, 41).to_dict()}
        return [queued, {**ENV, "name": "ci-2"}] if path == "/v1/envs" else queued


@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    """main() turns SIGTERM into KeyboardInterrupt, as `tt` does; not for the test process."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeClient]:
    def make(script: Callable[[FakeClient], None] | None = None, **kw: Any) -> FakeClient:
        c = FakeClient(script, **kw)
        monkeypatch.setattr(env_cmd, "_client", lambda: c)
        return c

    return make


def _add(*extra: str) -> int:
    return main(["env", "add", "ci-1", "--os-prefix", "debian-12", *extra])


def test_wait_flags_map_to_the_requests_wait_options() -> None:
    assert wait_options(False, None) == WaitOptions()
    assert wait_options(True, None) == WaitOptions(wait=False)
    assert wait_options(False, "10m") == WaitOptions(max_wait_s=600.0)
    assert wait_options(False, "90") == WaitOptions(max_wait_s=90.0)
    with pytest.raises(BadInput, match="--max-wait 'soon' is not a duration"):
        wait_options(False, "soon")
    with pytest.raises(SystemExit):  # one or the other
        make_parser().parse_args(
            ["env", "add", "x", "--os-prefix", "d", "--no-wait", "--max-wait", "1m"]
        )


@pytest.mark.parametrize(
    ("flags", "wait"),
    [
        ((), WaitOptions()),
        (("--no-wait",), WaitOptions(wait=False)),
        (("--max-wait", "90s"), WaitOptions(max_wait_s=90.0)),
        (("--max-wait", "2h", "--json"), WaitOptions(max_wait_s=7200.0)),
    ],
)
def test_env_add_sends_the_wait_options(
    fake: Callable[..., FakeClient], flags: tuple[str, ...], wait: WaitOptions
) -> None:
    c = fake()
    assert _add(*flags) == 0
    assert c.waits == [wait] and c.deleted == []


def test_bad_max_wait_is_refused_before_anything_is_asked(
    fake: Callable[..., FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    c = fake()
    assert _add("--max-wait", "31d") == 2
    assert "is outside 0 .. 30 days" in capsys.readouterr().err and c.waits == []


def test_env_add_shows_its_place_in_line_then_the_boot(
    fake: Callable[..., FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    def stream(c: FakeClient) -> None:
        assert c.on_queued and c.on_granted
        c.on_queued(_info(3))
        c.on_queued(_info(3, 8))  # the same place: no new line (not a terminal: lines)
        c.on_queued(_info(2, 9))
        c.on_granted(12.0)
        c.on_granted(12.0)  # a re-attached stream starts with granted again
        c.on_vm(VmUp("ci-1-0", "local", "qemu:debian-12:amd64", 4.2, "kvm"))

    fake(stream)
    assert _add() == 0
    out = capsys.readouterr().out
    assert "the cloud is busy: ENV ci-1 waits its turn" in out and "tt queue" in out
    assert out.count("queued: position 3, waiting for capacity (1 CPU free of 4") == 1
    assert "queued: position 2" in out
    assert out.count("granted after 12 s in the queue: booting") == 1
    assert "ci-1-0 up on local (kvm) in 4.2 s" in out and "ready in" in out
    assert out.index("position 3") < out.index("position 2") < out.index("granted")


def test_env_add_on_a_cloud_with_room_says_nothing_of_a_queue(
    fake: Callable[..., FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    def stream(c: FakeClient) -> None:
        assert c.on_granted
        c.on_granted(0.0)  # granted at once: the scheduler still says so
        c.on_vm(VmUp("ci-1-0", "local", "qemu:debian-12:amd64", 4.2, "kvm"))

    fake(stream)
    assert _add() == 0
    out = capsys.readouterr().out
    assert "queue" not in out and "granted" not in out and "ci-1-0 up on local" in out


def test_ctrl_c_while_queued_takes_the_request_back(
    fake: Callable[..., FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    def stream(c: FakeClient) -> None:
        assert c.on_queued
        c.on_queued(_info(4))
        raise KeyboardInterrupt

    c = fake(stream)
    assert _add() == 130
    assert c.deleted == ["ci-1"]
    err = capsys.readouterr().err
    assert "withdrawing ENV ci-1" in err and "ENV ci-1 withdrawn" in err


def test_ctrl_c_never_deletes_an_env_that_was_there_before(
    fake: Callable[..., FakeClient],
) -> None:
    def stream(c: FakeClient) -> None:
        raise KeyboardInterrupt

    c = fake(stream, existing=True)
    assert _add("--json") == 130
    assert c.deleted == []


def test_list_and_show_print_the_queue_info(
    fake: Callable[..., FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    fake()
    assert main(["env", "show", "ci-1"]) == 0
    out = capsys.readouterr().out
    assert "ENV ci-1 (queued)" in out and "position 2 in the queue (1 = next), waited 41 s" in out
    assert "blocked by: capacity: 1 CPU free of 4; needs 2" in out and "for 1 VM(s)" in out
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "queued #2 (capacity, 41 s)" in out and "ready" in out


def test_list_and_show_word_a_queued_env() -> None:
    queued = {**ENV, "state": "queued", "queue": _info(2, 41).to_dict()}
    assert state_text(queued) == "queued #2 (capacity, 41 s)"
    assert state_text(ENV) == "ready"
    assert state_text({**ENV, "queue": {"position": 1}}) == "ready"
    assert queue_lines(queued) == [
        "position 2 in the queue (1 = next), waited 41 s",
        "blocked by: capacity: 1 CPU free of 4; needs 2",
        "needs 2 CPU, 1024 MiB memory, 4 GiB disk for 1 VM(s) in all",
    ]
    assert queue_lines(ENV) == []
    assert "being decided" in queue_lines({**ENV, "state": "queued"})[0]
