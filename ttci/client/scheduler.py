"""The CLI's client of the scheduler API. HTTP errors become TTErrors with the server's words."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import requests

from ttci.client.config import ClientConfig
from ttci.model.errors import ApiError, BadInput, TTError

__all__ = ["ApiError", "Client"]


class Client:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {cfg.token}"

    def _call(self, method: str, path: str, *, timeout: Any = 60, **kw: Any) -> requests.Response:
        try:
            r = self.session.request(method, self.cfg.url + path, timeout=timeout, **kw)
        except requests.ConnectionError as e:
            raise TTError(
                f"cannot reach the scheduler at {self.cfg.server}",
                hint="is `tt up` (or tt-scheduler) running? see `tt config`",
            ) from e
        except requests.RequestException as e:
            raise TTError(f"request to {self.cfg.server} failed: {e}") from e
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"error": r.text[:300] or r.reason}
            msg, hint = str(body.get("error")), body.get("hint")
            if r.status_code == 400:
                raise BadInput(msg, hint=hint)
            raise ApiError(msg, hint=hint, status=r.status_code)
        return r

    def call_json(self, method: str, path: str, **kw: Any) -> Any:
        return self._call(method, path, **kw).json()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params=params).json()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/v1/status")
        return out

    def create_env(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._call("POST", "/v1/envs", json=body, timeout=900).json()
        return out

    def create_env_progress(
        self, body: dict[str, Any], on_vm: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Create an ENV, calling on_vm as each VM comes up; returns the ready ENV."""
        r = self._call(
            "POST", "/v1/envs", params={"progress": "1"}, json=body, stream=True, timeout=(10, 900)
        )
        try:
            for line in r.iter_lines():
                if not line:
                    continue
                ev = json.loads(line)
                if ev["event"] == "vm":
                    on_vm(ev)
                elif ev["event"] == "ready":
                    env: dict[str, Any] = ev["env"]
                    return env
                elif ev["event"] == "error":
                    if ev.get("status") == 400:
                        raise BadInput(ev["error"], hint=ev.get("hint"))
                    raise ApiError(ev["error"], hint=ev.get("hint"), status=ev.get("status", 0))
        except requests.RequestException as e:
            raise TTError(
                f"the scheduler's stream broke off: {e}",
                hint="`tt env show` tells what exists; delete and retry",
            ) from e
        finally:
            r.close()
        raise TTError(
            "the scheduler ended the ENV stream without an answer",
            hint="`tt env show` tells what exists",
        )

    def extend_env(self, name: str, life_time: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call(
            "POST", f"/v1/envs/{name}/extend", json={"life_time": life_time}
        ).json()
        return out

    def show_env(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/v1/envs/{name}")
        return out

    def delete_env(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call("DELETE", f"/v1/envs/{name}", timeout=600).json()
        return out

    def run(self, name: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        r = self._call("POST", f"/v1/envs/{name}/run", json=body, stream=True, timeout=(10, None))
        try:
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)
        except requests.RequestException as e:
            raise TTError(
                f"the scheduler's stream broke off: {e}",
                hint="`tt env show` tells the VMs' state; run the command again",
            ) from e
        finally:
            r.close()

    def push(self, name: str, dest: str, tar: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call(
            "PUT", f"/v1/envs/{name}/files", params={"dest": dest}, data=tar, timeout=900
        ).json()
        return out

    def get_files(self, name: str, path: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call(
            "GET", f"/v1/envs/{name}/files", params={"path": path}, timeout=900
        ).json()
        return out

    def report_result(self, name: str, result: str) -> dict[str, Any]:
        """Record how the job in ENV `name` ended: success, failed, cancelled or error."""
        out: dict[str, Any] = self._call(
            "POST", f"/v1/envs/{name}/result", json={"result": result}
        ).json()
        return out
