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

__all__ = ["EnvExec"]


class EnvExec(SchedulerCore):
    def exec(
        self, name: str, user: User, req: dict[str, Any], only: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Run on every VM of the ENV (or those named in only) at once; events are tagged with
        the VM's name."""
        vms = self._exec_targets(name, user, only)
        events: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1024)
        stop = threading.Event()

        def put(ev: dict[str, Any]) -> bool:
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
                if ev["event"] == "done":
                    remaining -= 1
                    continue
                if ev["event"] != "start":
                    yield ev
        finally:
            stop.set()

    def _exec_targets(self, name: str, user: User, only: list[str] | None) -> list[dict[str, Any]]:
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
        self, v: dict[str, Any], req: dict[str, Any], put: Callable[[dict[str, Any]], bool]
    ) -> None:
        """One VM's part of an exec: its events tagged with its name, then "done"."""
        ended = False
        try:
            if v["state"] != "running":
                raise TTError(f"VM is {v['state']}: {v['error'] or 'not running'}")
            for ev in self._client(v["host"]).exec(v["id"], req):
                if ev.get("event") == "error" and ev.get("lost"):
                    self._set_vm(v["id"], state="lost", error=ev.get("message", ""))
                ended = ended or ev.get("event") in ("exit", "error")
                if not put({**ev, "vm": v["name"]}):
                    return  # closing the stream makes hostd cancel the command
            if not ended:
                put(
                    {
                        "event": "error",
                        "vm": v["name"],
                        "message": "the command's output ended without a result",
                    }
                )
        except HostUnreachable as e:
            self._set_vm(v["id"], state="lost", error=e.message)
            put({"event": "error", "vm": v["name"], "message": e.message, "lost": True})
        except Exception as e:
            msg = e.message if isinstance(e, TTError) else repr(e)
            if isinstance(e, HostdError) and e.status == 410:
                self._set_vm(v["id"], state="lost", error=msg)
            put({"event": "error", "vm": v["name"], "message": msg})
        finally:
            put({"event": "done", "vm": v["name"]})

    def push(self, name: str, user: User, dest: str, tar: bytes) -> list[dict[str, Any]]:
        self._env_row(name, user)

        def one(c: HostdClient, v: dict[str, Any]) -> None:
            c.push(v["id"], dest, tar)

        return self._each_vm(name, one)

    def get(self, name: str, user: User, path: str) -> list[dict[str, Any]]:
        self._env_row(name, user)
        return self._each_vm(name, lambda c, v: base64.b64encode(c.get(v["id"], path)).decode())

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
