"""ttci.infra.proc.stop: the one way a child process is ended (TERM, KILL after a grace)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ttci.infra.proc import spawn, stop

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def test_a_child_that_obeys_sigterm_ends_with_it() -> None:
    proc = spawn(["sleep", "60"])
    assert stop(proc, grace=5) == -signal.SIGTERM


def test_a_child_ignoring_sigterm_is_killed_after_the_grace() -> None:
    proc = subprocess.Popen([sys.executable, "-c", IGNORE_TERM])
    time.sleep(0.3)  # let it install its handler
    t0 = time.monotonic()
    assert stop(proc, grace=0.5) == -signal.SIGKILL
    assert 0.4 < time.monotonic() - t0 < 10


def test_grace_zero_kills_at_once_and_an_ended_child_is_just_reaped() -> None:
    proc = spawn(["sleep", "60"])
    assert stop(proc, grace=0) == -signal.SIGKILL
    done = spawn(["true"])
    done.wait()
    assert stop(done) == 0


def test_group_stop_reaches_the_grandchildren() -> None:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    stop(proc, grace=5, group=True)
    proc.stdout.close()
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("the grandchild outlived its group's stop")
