"""The GitLab driver's prepare in TT CI's admission queue, against a stand-in client (fast, no
VM): its place in line in the job log (a line when it changes, at most one per ~5 s otherwise),
TT_MAX_WAIT, a SIGTERM while queued withdrawing the request, and the harness's cancel during
prepare. The real queue is in test_gitlab_queue_vm.py."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner_executor.core import job
from runner_executor.driver import Cancelled, Driver, DriverError
from tests.gitlab.harness import Job, Runner
from ttci.model.errors import ApiError
from ttci.model.resources import Resources
from ttci.wire.envs import EnvRequest, VmUp
from ttci.wire.queue import QueueInfo, WaitOptions

IMAGE = "qemu:debian-12:amd64"


def _info(position: int, waited: float = 2.0, blocked_by: str = "capacity") -> QueueInfo:
    detail = "needs 1 CPU, 1024 MiB memory, 4 GiB disk in all; free now: 0 CPU"
    return QueueInfo(position, blocked_by, detail, Resources(1, 1024, 4), 1, waited)


class FakeClient:
    """What prepare uses of Client; `stream` plays the scheduler's progress events."""

    def __init__(self, stream: Callable[[FakeClient], None]) -> None:
        self.stream = stream
        self.waits: list[WaitOptions | None] = []
        self.deleted: list[str] = []
        self.delete_status = 0  # an ApiError status for delete_env, 0: it works
        self.on_queued: Callable[[QueueInfo], None] = lambda info: None
        self.on_granted: Callable[[float], None] = lambda s: None
        self.on_vm: Callable[[VmUp], None] = lambda vm: None

    def get(self, path: str) -> list[dict[str, str]]:
        assert path == "/v1/images"
        return [{"name": IMAGE}]

    def show_env(self, name: str) -> dict[str, Any]:
        raise ApiError(f"no ENV {name}", status=404)

    def create_env_progress(
        self,
        req: EnvRequest,
        on_vm: Callable[[VmUp], None],
        *,
        on_queued: Callable[[QueueInfo], None] | None = None,
        on_granted: Callable[[float], None] | None = None,
        wait: WaitOptions | None = None,
    ) -> dict[str, Any]:
        assert on_queued and on_granted
        self.on_vm, self.on_queued, self.on_granted = on_vm, on_queued, on_granted
        self.waits.append(wait)
        self.stream(self)
        return {"name": req.name, "vms": []}

    def delete_env(self, name: str) -> dict[str, Any]:
        self.deleted.append(name)
        if self.delete_status:
            raise ApiError("refused", status=self.delete_status)
        return {"name": name, "deleted": True}


def _driver(c: FakeClient, tmp_path: Path, **variables: str) -> tuple[Driver, io.BytesIO]:
    env = {
        "CUSTOM_ENV_CI_JOB_ID": "7",
        "CUSTOM_ENV_TT_OS": "debian-12",
        "TMPDIR": str(tmp_path),
        **{f"CUSTOM_ENV_{k}": v for k, v in variables.items()},
    }
    err = io.BytesIO()
    return Driver(env, out=io.BytesIO(), err=err, client_factory=lambda: c), err  # type: ignore[arg-type, return-value]


def test_max_wait_comes_from_tt_max_wait() -> None:
    assert job.wait_options({}) == WaitOptions()
    assert job.wait_options({"TT_MAX_WAIT": " 30m "}) == WaitOptions(max_wait_s=1800.0)
    assert job.wait_options({"TT_MAX_WAIT": "90"}) == WaitOptions(max_wait_s=90.0)
    for bad in ("soon", "-5", "31d"):
        with pytest.raises(job.JobError) as e:  # the job's mistake: a build failure
            job.wait_options({"TT_MAX_WAIT": bad})
        assert "TT_MAX_WAIT" in e.value.message and e.value.hint


def test_a_queue_line_when_the_place_changes_else_every_5_s() -> None:
    every = job.QUEUE_LINE_EVERY_S
    assert every == 5.0
    assert job.queue_news(None, 4, 0.0)
    assert not job.queue_news((4, 0.0), 4, every - 0.1)
    assert job.queue_news((4, 0.0), 4, every)
    assert job.queue_news((4, 0.0), 3, 0.1)


def test_prepare_prints_its_place_in_the_queue_then_the_grant(tmp_path: Path) -> None:
    def stream(c: FakeClient) -> None:
        for pos in (3, 3, 3, 2, 2, 1):  # the scheduler's events, seconds apart at most
            c.on_queued(_info(pos))
        c.on_granted(14.0)
        c.on_granted(14.0)  # a re-attached stream starts with granted again
        c.on_vm(VmUp("gl-7-0", "local", IMAGE, 3.5, "kvm"))

    c = FakeClient(stream)
    d, err = _driver(c, tmp_path, TT_MAX_WAIT="10m")
    assert d.prepare() == 0
    log = err.getvalue().decode()
    assert c.waits == [WaitOptions(max_wait_s=600.0)]
    assert log.count("the cloud is busy: ENV gl-7 waits in TT CI's queue") == 1
    for pos in (3, 2, 1):  # one line per place, not one per event
        assert log.count(f"TT CI: queued: position {pos}, waiting for capacity (needs 1 CPU") == 1
    assert log.count("TT CI: capacity granted after 14 s in the queue; booting the VM") == 1
    assert "VM gl-7-0 is up on host local with kvm" in log and "ready in" in log
    assert log.index("position 3") < log.index("position 1") < log.index("granted")


def test_a_cloud_with_room_prints_no_queue_lines(tmp_path: Path) -> None:
    def stream(c: FakeClient) -> None:
        c.on_granted(0.0)  # granted at once: the scheduler still says so
        c.on_vm(VmUp("gl-7-0", "local", IMAGE, 3.5, "kvm"))

    c = FakeClient(stream)
    d, err = _driver(c, tmp_path)
    assert d.prepare() == 0
    assert c.waits == [WaitOptions()]  # no TT_MAX_WAIT: as long as it takes
    assert "queue" not in err.getvalue().decode()


def test_waiting_past_tt_max_wait_is_a_system_failure_that_says_so(tmp_path: Path) -> None:
    def stream(c: FakeClient) -> None:
        c.on_queued(_info(1))
        raise ApiError("ENV gl-7 waited 60 s for capacity, longer than its max_wait", status=408)

    d, _ = _driver(FakeClient(stream), tmp_path, TT_MAX_WAIT="1m")
    with pytest.raises(DriverError) as e:
        d.prepare()
    assert "waited longer than TT_MAX_WAIT (60 s) in TT CI's queue" in e.value.message
    assert e.value.hint and "tt queue" in e.value.hint
    assert job.is_system_error(e.value)


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (0, "ENV gl-7 withdrawn"),
        (404, None),  # the scheduler saw the stream close and took it out itself
        (409, "ENV gl-7 is still booting; cleanup deletes it"),
    ],
)
def test_sigterm_while_queued_withdraws_the_request(
    tmp_path: Path, status: int, said: str | None
) -> None:
    def stream(c: FakeClient) -> None:
        c.on_queued(_info(2))
        os.kill(os.getpid(), signal.SIGTERM)  # the runner: the job was cancelled or timed out
        raise AssertionError("SIGTERM did not stop prepare")

    c = FakeClient(stream)
    c.delete_status = status
    d, err = _driver(c, tmp_path)
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Cancelled) as e:
        d.prepare()
    assert signal.getsignal(signal.SIGTERM) == old  # prepare's handler is gone again
    assert "while it waited in TT CI's queue (position 2)" in e.value.message
    assert c.deleted == ["gl-7"]
    log = err.getvalue().decode()
    assert (said in log) if said else ("withdraw" not in log)


def test_harness_cancel_during_prepare_is_not_retried_and_cleanup_runs(tmp_path: Path) -> None:
    slow = tmp_path / "slow.sh"
    slow.write_text('#!/bin/bash\n[ "$1" = prepare ] && { echo waiting >&2; sleep 30; }\nexit 0\n')
    slow.chmod(0o755)
    r = Runner([str(slow)], graceful_kill_timeout=5, prepare_retry_delay=0).run_job(
        Job(8, ["true"]), cancel_during="prepare", cancel_after_s=0.5
    )
    assert (r.status, r.prepare_attempts) == ("canceled", 1)
    [prepare] = r.of("prepare")
    assert prepare.signals[:2] == ["cancel", "TERM"] and prepare.seconds < 5
    assert [c.what for c in r.calls] == ["config", "prepare", "cleanup"]
    assert "waiting" in r.text()
