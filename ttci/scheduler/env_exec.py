"""Commands and files on an ENV's VMs: one exec fanned out to every VM, push and get."""

from __future__ import annotations

import base64
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ttci.model.errors import BadInput, TTError
from ttci.scheduler.core import PARALLEL_CREATES, SchedulerCore
from ttci.scheduler.hostd_client import HostdClient, HostdError, HostUnreachable
from ttci.scheduler.users import User
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest

__all__ = ["EnvExec"]


class EnvExec(SchedulerCore):
    def exec(self, name: str, user: User, req: ExecRequest) -> Iterator[ExecEvent]:
        """Run on every VM of the ENV (or those named in req.vms) at once; events are tagged
        with the VM's name."""
        vms = self._exec_targets(name, user, req.vms)
        # str: a VM is done. Each event holds at most one frame of a guest's output (1 MiB): a
        # slow client holds up the VMs' streams (hostd's, then the guests') at 32 MiB here.
        events: queue.Queue[ExecEvent | str] = queue.Queue(maxsize=32)
        stop = threading.Event()

        def put(ev: ExecEvent | str) -> bool:
            while not stop.is_set():  # the client left: drop, never block
                try:
                    events.put(ev, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        for v in vms:
            threading.Thread(target=self._exec_on_vm, args=(v, req, put), daemon=True).start()
        remaining = len(vms)
        try:
            while remaining:
                ev = events.get()
                if isinstance(ev, str):
                    remaining -= 1
                elif ev.kind is not EventKind.START:
                    yield ev
        finally:
            stop.set()

    def _exec_targets(
        self, name: str, user: User, only: tuple[str, ...] | None
    ) -> list[dict[str, Any]]:
        self._env_row(name, user)
        vms = self._vm_rows(name)
        if not vms:
            raise BadInput(f"ENV {name} has no VMs", hint="create it again")
        if only:
            unknown = sorted(set(only) - {v["name"] for v in vms})
            if unknown:
                raise BadInput(
                    f"ENV {name} has no VM {', '.join(unknown)}",
                    hint=f"its VMs: {', '.join(v['name'] for v in vms[:20])}",
                )
            vms = [v for v in vms if v["name"] in only]
        return vms

    def _exec_on_vm(
        self, v: dict[str, Any], req: ExecRequest, put: Callable[[ExecEvent | str], bool]
    ) -> None:
        """One VM's part of an exec: its events tagged with its name, then its name alone."""
        vm, ended = v["name"], False
        try:
            if v["state"] != "running":
                raise TTError(f"VM is {v['state']}: {v['error'] or 'not running'}")
            for ev in self._client(v["host"]).exec(v["id"], req):
                if ev.lost:
                    self._set_vm(v["id"], state="lost", error=ev.message)
                ended = ended or ev.final
                if not put(ev.with_vm(vm)):
                    return  # closing the stream makes hostd cancel the command
            if not ended:
                put(ExecEvent.error("the command's output ended without a result", vm=vm))
        except HostUnreachable as e:
            self._set_vm(v["id"], state="lost", error=e.message)
            put(ExecEvent.error(e.message, lost=True, vm=vm))
        except Exception as e:
            msg = e.message if isinstance(e, TTError) else repr(e)
            if isinstance(e, HostdError) and e.status == 410:
                self._set_vm(v["id"], state="lost", error=msg)
            put(ExecEvent.error(msg, vm=vm))
        finally:
            put(vm)

    def push(self, name: str, user: User, dest: str, tar: bytes) -> list[dict[str, Any]]:
        self._env_row(name, user)

        def one(c: HostdClient, v: dict[str, Any]) -> None:
            c.push(v["id"], dest, tar)

        return self._each_vm(name, one)

    def get(self, name: str, user: User, path: str, limit: int) -> list[dict[str, Any]]:
        """Each VM's tar of path (base64), each at most limit bytes (else that VM's error)."""
        self._env_row(name, user)
        return self._each_vm(
            name, lambda c, v: base64.b64encode(c.get(v["id"], path, limit)).decode()
        )

    def _each_vm(
        self, env: str, fn: Callable[[HostdClient, dict[str, Any]], Any]
    ) -> list[dict[str, Any]]:
        def one(v: dict[str, Any]) -> dict[str, Any]:
            try:
                return {"vm": v["name"], "ok": True, "data": fn(self._client(v["host"]), v)}
            except TTError as e:
                return {"vm": v["name"], "ok": False, "error": e.message}

        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CREATES) as pool:
            return list(pool.map(one, self._vm_rows(env)))
