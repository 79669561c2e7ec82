"""The client of the scheduler API (CLI, CI plugins). HTTP errors become TTErrors with the
server's words (ttci.wire.api.api_error); requests and answers are the ttci.wire shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
from urllib3.exceptions import NewConnectionError

from ttci.client.config import ClientConfig
from ttci.client.exec_stream import exec_events
from ttci.client.failover import (
    IDEMPOTENT,
    MANY_CONNECT_S,
    AllFailed,
    Failure,
    Servers,
    retryable_503,
)
from ttci.infra.tls import tls_error
from ttci.model.errors import ApiError, TTError
from ttci.wire.api import api_error
from ttci.wire.commands import ExecEvent, ExecRequest
from ttci.wire.envs import EnvEvent, EnvRequest, VmUp
from ttci.wire.jobs import JobResult
from ttci.wire.queue import QueueInfo, WaitOptions

__all__ = ["DELETE_WAIT_S", "ApiError", "Client"]

DELETE_WAIT_S = 300.0  # how long delete_env_wait waits for an ENV still being created
REATTACH_TRIES = 5  # a broken progress stream is followed again this often
REATTACH_WAIT_S = 60.0  # how long one re-attach waits for the scheduler to answer again


class Client:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {cfg.token}"
        # https: the CA, else the system's store. Passed on each request: a session's verify
        # loses to REQUESTS_CA_BUNDLE in the environment, an explicit one does not.
        self._verify: str | bool = str(cfg.ca) if cfg.ca else True
        self.servers = Servers(cfg.urls)

    def _call(self, method: str, path: str, *, timeout: Any = 60, **kw: Any) -> requests.Response:
        """One request, to the first replica that takes it (ttci/client/failover.py)."""
        timeout = self._timeout(timeout)

        def send(url: str) -> requests.Response:
            r = self.session.request(method, url + path, timeout=timeout, verify=self._verify, **kw)
            if r.status_code == 503 and retryable_503(503, r.headers.get("Retry-After"), r.content):
                r.close()
                raise _Unavailable(url, r)
            return r

        try:
            r = self.servers.call(send, _failure_of, idempotent=method in IDEMPOTENT)
        except AllFailed as e:
            if isinstance(e.last, _Unavailable):
                r = e.last.response
                raise api_error(r.status_code, r.content, r.reason) from e
            raise
        except requests.exceptions.SSLError as e:
            tls = tls_error(e, f"the scheduler at {self._where(e)}", self.cfg.ca)
            raise tls or TTError(f"TLS with the scheduler at {self._where(e)} failed: {e}") from e
        except requests.RequestException as e:
            raise TTError(
                f"the connection to the scheduler at {self._where(e)} broke before it answered "
                f"{method} {path}: {e}",
                hint="the request may have been carried out: check (e.g. `tt env show`) "
                "before repeating it",
            ) from e
        if r.status_code >= 400:
            raise api_error(r.status_code, r.content, r.reason)
        return r

    def _timeout(self, timeout: Any) -> Any:
        """With several replicas a connect waits at most MANY_CONNECT_S: a dead one is
        skipped quickly (the read timeout stays)."""
        if not self.servers.many:
            return timeout
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        return (min(connect, MANY_CONNECT_S), read)

    def _where(self, e: requests.RequestException) -> str:
        req = e.request
        url = str(req.url) if req is not None and req.url else self.cfg.url
        return next((u for u in self.cfg.urls if url.startswith(u)), url)

    def call_json(self, method: str, path: str, **kw: Any) -> Any:
        return self._call(method, path, **kw).json()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params=params).json()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/v1/status")
        return out

    def create_env(
        self, req: EnvRequest | dict[str, Any], wait: WaitOptions | None = None
    ) -> dict[str, Any]:
        """Create an ENV and wait (in the admission queue, then for the boots) until every VM
        is up; returns the ENV as `show_env` does. (A dict request: as the API takes it.)"""
        return self.create_env_progress(req, lambda vm: None, wait=wait)

    def plan_env(self, req: EnvRequest) -> dict[str, Any]:
        """Where the ENV's VMs would go now ({name, vm_count, hosts}); nothing is created."""
        out: dict[str, Any] = self.call_json(
            "POST", "/v1/envs", params={"dry_run": "1"}, json=req.to_dict()
        )
        return out

    def create_env_progress(
        self,
        req: EnvRequest | dict[str, Any],
        on_vm: Callable[[VmUp], None],
        *,
        on_queued: Callable[[QueueInfo], None] | None = None,
        on_granted: Callable[[float], None] | None = None,
        wait: WaitOptions | None = None,
    ) -> dict[str, Any]:
        """Create an ENV, calling on_queued while it waits for capacity (with its position),
        on_granted when its VMs start booting and on_vm as each comes up; returns the ready ENV.

        A broken stream (the scheduler restarted, a proxy timed out) is followed again through
        GET /v1/envs/NAME/progress. Closing the stream (Ctrl-C: KeyboardInterrupt passes
        through) takes a still-queued ENV out of the queue on the scheduler.

        Raises:
            BadInput, ApiError: refused (too big, no image, name taken, waited past max_wait).
        """
        body = req.to_dict() if isinstance(req, EnvRequest) else dict(req)
        if wait is not None:
            body.update(wait.to_dict())
        name = str(body.get("name", ""))
        handlers = _Handlers(on_vm, on_queued, on_granted)
        r = self._call(
            "POST", "/v1/envs", params={"progress": "1"}, json=body, stream=True, timeout=(10, 900)
        )
        for attempt in range(REATTACH_TRIES + 1):
            try:
                env = handlers.follow(r)
            except requests.RequestException as e:
                if attempt == REATTACH_TRIES:
                    raise TTError(
                        f"the scheduler's stream for ENV {name} kept breaking off: {e}",
                        hint="`tt env show` tells what exists; delete and retry",
                    ) from e
                r = self._reattach(name, attempt)
                continue
            finally:
                r.close()
            if env is not None:
                return env
            r = self._reattach(name, attempt)  # ended without a result: follow it again
        raise TTError(
            f"the scheduler ended the stream of ENV {name} without an answer",
            hint="`tt env show` tells what exists",
        )

    def _reattach(self, name: str, attempt: int) -> requests.Response:
        """Follow the ENV's progress again, waiting for a restarting scheduler (about a
        minute in all) before giving up with its last error."""
        deadline = time.monotonic() + REATTACH_WAIT_S
        delay = min(2.0 * (attempt + 1), 10.0)
        while True:
            time.sleep(delay)
            try:
                return self._call(
                    "GET", f"/v1/envs/{name}/progress", stream=True, timeout=(10, 900)
                )
            except ApiError as e:
                if e.status not in (502, 503, 504) or time.monotonic() > deadline:
                    raise  # the scheduler answered: the ENV is gone, or not ours
            except TTError:  # cannot reach it (yet)
                if time.monotonic() > deadline:
                    raise
            delay = min(delay * 1.5, 10.0)

    def extend_env(self, name: str, life_time: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call(
            "POST", f"/v1/envs/{name}/extend", json={"life_time": life_time}
        ).json()
        return out

    def show_env(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/v1/envs/{name}")
        return out

    def delete_env(self, name: str, commit_cache: bool = False) -> dict[str, Any]:
        """commit_cache: the job succeeded; the ENV's cache clones become the newest versions."""
        params = {"commit_cache": "1"} if commit_cache else {}
        r = self._call("DELETE", f"/v1/envs/{name}", timeout=600, params=params)
        out: dict[str, Any] = r.json()
        return out

    def caches(self) -> list[dict[str, Any]]:
        """The pool's cache volumes: yours (an admin: all)."""
        out: list[dict[str, Any]] = self._call("GET", "/v1/caches").json()
        return out

    def delete_cache(self, key: str, project: str = "", owner: str = "") -> dict[str, Any]:
        params = {k: v for k, v in (("project", project), ("owner", owner)) if v}
        out: dict[str, Any] = self._call("DELETE", f"/v1/caches/{key}", params=params).json()
        return out

    def delete_env_wait(
        self,
        name: str,
        wait_s: float = DELETE_WAIT_S,
        poll_s: float = 1.0,
        commit_cache: bool = False,
    ) -> bool:
        """Delete the ENV, waiting up to wait_s while the scheduler answers 409 (the ENV is
        still being created, or another delete of it is under way).

        Returns:
            True if this call deleted it, False if there was no such ENV (404).
        Raises:
            ApiError: any other refusal, or still 409 after wait_s.
            TTError: the scheduler could not be reached.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.delete_env(name, commit_cache)
                return True
            except ApiError as e:
                if e.status == 404:
                    return False
                if e.status == 409 and time.monotonic() < deadline:
                    time.sleep(poll_s)
                    continue
                raise

    def exec(self, name: str, req: ExecRequest) -> Iterator[ExecEvent]:
        """Run a command in the ENV's VMs (req.vms: some of them); its events as they come."""
        return exec_events(self.cfg, name, req)

    def push(self, name: str, dest: str, tar: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call(
            "PUT", f"/v1/envs/{name}/files", params={"dest": dest}, data=tar, timeout=900
        ).json()
        return out

    def get_files(self, name: str, path: str, limit: int = 1 << 30) -> list[dict[str, Any]]:
        """Each VM's tar of path (base64 in `data`). The answer is read as it comes and refused
        once it holds more than limit bytes of tar in all (tt's cap, TT_MAX_FILES)."""
        r = self._call(
            "GET", f"/v1/envs/{name}/files", params={"path": path}, stream=True, timeout=(10, 900)
        )
        most = limit * 4 // 3 + (64 << 10)  # base64, and the JSON around it
        body = bytearray()
        try:
            for chunk in r.iter_content(1 << 20):
                body += chunk
                if len(body) > most:
                    raise TTError(
                        f"the files from {name} are over tt's limit of {limit} bytes",
                        hint="ask for less, or raise TT_MAX_FILES (e.g. TT_MAX_FILES=4G)",
                    )
        except requests.RequestException as e:
            where = next((u for u in self.cfg.urls if r.url.startswith(u)), r.url)
            raise TTError(
                f"the scheduler at {where} broke off its answer: {e}",
                hint=f"get the files again (`tt env get {name} ...`): any replica will do",
            ) from e
        finally:
            r.close()
        out: list[dict[str, Any]] = json.loads(body)
        return out

    def report_result(self, name: str, result: JobResult) -> dict[str, Any]:
        """Record how the job in ENV `name` ended in the scheduler's job history."""
        out: dict[str, Any] = self._call(
            "POST", f"/v1/envs/{name}/result", json=result.to_dict()
        ).json()
        return out


class _Handlers:
    """Reads one progress stream, handing each event to its callback."""

    def __init__(
        self,
        on_vm: Callable[[VmUp], None],
        on_queued: Callable[[QueueInfo], None] | None,
        on_granted: Callable[[float], None] | None,
    ) -> None:
        self.on_vm, self.on_queued, self.on_granted = on_vm, on_queued, on_granted

    def follow(self, r: requests.Response) -> dict[str, Any] | None:
        """The ready ENV; None if the stream ended without a result. Raises the error event."""
        for line in r.iter_lines():
            if not line:
                continue
            ev = EnvEvent.from_dict(json.loads(line))
            if ev.kind == "queued" and ev.queue is not None:
                if self.on_queued:
                    self.on_queued(ev.queue)
            elif ev.kind == "granted":
                if self.on_granted:
                    self.on_granted(ev.waited_s)
            elif ev.vm is not None:
                self.on_vm(ev.vm)
            elif ev.env is not None:
                return dict(ev.env)
            elif ev.error is not None:
                raise ev.error.exception(ev.status)
        return None


class _Unavailable(Exception):
    """A replica answered 503 with Retry-After: it did nothing; try the next."""

    def __init__(self, url: str, response: requests.Response) -> None:
        super().__init__(f"{url} is unavailable (503)")
        self.response = response


def _failure_of(e: Exception) -> Failure | None:
    """How a requests failure lets the request move on (ttci/client/failover.py)."""
    if isinstance(e, _Unavailable):
        return Failure.UNAVAILABLE
    if isinstance(e, requests.exceptions.SSLError):
        return None  # the certificate or the CA: another replica will not fix that
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return Failure.CONNECT
    if isinstance(e, requests.ConnectionError):
        reason = getattr(e.args[0], "reason", None) if e.args else None
        # NewConnectionError: refused, unreachable, and (NameResolutionError) DNS.
        return Failure.CONNECT if isinstance(reason, NewConnectionError) else Failure.BROKEN
    if isinstance(e, requests.Timeout):
        return Failure.BROKEN
    return None
