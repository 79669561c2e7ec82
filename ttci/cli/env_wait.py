"""`tt env add` waiting in the admission queue: the wait options, the live progress (its place
in line while it waits, then the boot), the queue's words in `tt env list/show`, and taking an
interrupted request back so nothing stays queued or booting."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.status import Status

from ttci.client.scheduler import Client
from ttci.model.errors import ApiError, TTError
from ttci.wire.envs import EnvRequest, VmUp
from ttci.wire.queue import QueueInfo, WaitOptions, parse_wait_seconds

__all__ = [
    "QUEUE_LINE_EVERY_S",
    "Live",
    "exists",
    "queue_lines",
    "state_text",
    "wait_options",
    "withdraw",
]

QUEUE_LINE_EVERY_S = 30.0  # without a terminal: a line when the position changes, or this often


def wait_options(no_wait: bool, max_wait: str | None) -> WaitOptions:
    """`--no-wait` / `--max-wait DURATION` as the scheduler takes them (BadInput: bad text)."""
    if no_wait:
        return WaitOptions(wait=False)
    if max_wait is None:
        return WaitOptions()
    return WaitOptions(max_wait_s=parse_wait_seconds(max_wait, "--max-wait"))


def exists(c: Client, name: str) -> bool:
    try:
        c.show_env(name)
    except ApiError as e:
        if e.status == 404:
            return False
        raise
    return True


def withdraw(c: Client, name: str) -> None:
    """Take back an interrupted `tt env add`: out of the queue if it still waits, else delete
    the ENV (once its VMs are up: the scheduler answers 409 while they boot). A second Ctrl-C
    stops waiting for that."""
    print(f"interrupted: withdrawing ENV {name} ...", file=sys.stderr, flush=True)
    try:
        gone = c.delete_env_wait(name)
    except KeyboardInterrupt:
        print(f"stopped; `tt env del {name}` deletes it", file=sys.stderr)
        return
    except TTError as e:
        print(f"could not delete ENV {name}: {e.message}; try `tt env del {name}`", file=sys.stderr)
        return
    print(f"ENV {name} {'withdrawn' if gone else 'was not created'}", file=sys.stderr)


class Live:
    """The progress of one `tt env add`: a status line (its place in the queue while it waits,
    then the boot) and a line per VM up. Without a terminal (a log) the status line is not
    drawn, so the queue's news are lines: when the position changes, else every 30 s."""

    def __init__(self, console: Console, name: str, t0: float) -> None:
        self.out, self.name, self.t0 = console, name, t0
        self.last: tuple[int, float] | None = None  # the position last shown, and when
        self.st: Status | None = None
        self.granted = False  # granted comes at once when nothing waits, again on a re-attach

    def create(self, c: Client, req: EnvRequest, wait: WaitOptions) -> dict[str, Any]:
        with self.out.status(f"creating ENV {self.name}: placing and booting fresh VMs ...") as st:
            self.st = st
            return c.create_env_progress(
                req, self.on_vm, on_queued=self.on_queued, on_granted=self.on_granted, wait=wait
            )

    def _status(self, text: str) -> None:
        if self.st is not None:
            self.st.update(text)

    def on_queued(self, info: QueueInfo) -> None:
        now = time.monotonic()
        if self.last is None:
            self.out.print(
                f"  the cloud is busy: ENV {self.name} waits its turn "
                "(`tt queue` shows the line; Ctrl-C withdraws it)",
                highlight=False,
            )
        self._status(f"ENV {self.name} {info.sentence()} ...")
        if self.out.is_terminal:
            self.last = (info.position, now)
            return
        if (
            self.last is None
            or info.position != self.last[0]
            or now - self.last[1] >= QUEUE_LINE_EVERY_S
        ):
            self.out.print(f"  {info.sentence()}", highlight=False)
            self.last = (info.position, now)

    def on_granted(self, waited_s: float) -> None:
        if self.last is not None and not self.granted:  # it waited: say when that ended
            line = f"  granted after {waited_s:.0f} s in the queue: booting"
            self.out.print(line, highlight=False)
        self.granted = True
        self._status(f"creating ENV {self.name}: booting fresh VMs ...")

    def on_vm(self, vm: VmUp) -> None:
        self.out.print(
            f"  {vm.vm} up on {vm.host} ({vm.accel}) in {vm.boot_s:.1f} s", highlight=False
        )
        self._status(
            f"creating ENV {self.name}: {vm.vm} is up, {time.monotonic() - self.t0:.0f} s ..."
        )


def state_text(env: dict[str, Any]) -> str:
    """An ENV's state for `tt env list`; a queued one's says its place and what blocks it."""
    if env["state"] == "queued" and env.get("queue"):
        info = QueueInfo.from_dict(env["queue"])
        why = info.blocked_by.replace("_", " ")
        return f"queued #{info.position} ({why}, {info.waited_s:.0f} s)"
    return str(env["state"])


def queue_lines(env: dict[str, Any]) -> list[str]:
    """`tt env show`'s words for a queued ENV: position, blocker, detail, wait, needs."""
    if env.get("state") != "queued":
        return []
    if not env.get("queue"):
        return ["queued: its place in line is being decided (see `tt queue`)"]
    info = QueueInfo.from_dict(env["queue"])
    return [
        f"position {info.position} in the queue (1 = next), waited {info.waited_s:.0f} s",
        f"blocked by: {info.blocked_by.replace('_', ' ')}: {info.detail}",
        f"needs {info.needs.text()} for {info.vms} VM(s) in all"
        + (" (capacity is being reserved for it)" if info.reserved else ""),
    ]
