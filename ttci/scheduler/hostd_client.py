"""The scheduler's client for one hostd. HTTP errors become TTErrors with hostd's message.

A host that does not answer is HostUnreachable with the host's id and a short reason, never its
address (users read these errors; `tt-scheduler -v` logs the address and the details).

A host registered with an https URL is verified against the scheduler's CA (`tt-scheduler
--ca`, set once with HostdClient.trust), else against the system's trust store; a certificate
that does not verify is logged as a warning (it is the operator's to fix)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import requests

from ttci.infra.tls import tls_error
from ttci.model.errors import BadInput, TTError
from ttci.wire.api import ErrorBody, at_version
from ttci.wire.commands import ExecEvent, ExecRequest
from ttci.wire.envs import VMRequest

__all__ = ["HostUnreachable", "HostdClient", "HostdError"]

log = logging.getLogger("ttci.scheduler.hostd_client")


class HostdError(TTError):
    """hostd refused a request or could not be reached."""

    def __init__(
        self, message: str, *, hint: str | None = None, status: int = 0, kind: str = ""
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.kind = kind


class HostUnreachable(HostdError):
    """The host did not answer."""


class HostdClient:
    ca: ClassVar[Path | None] = None  # the process's CA for https hosts (see trust)

    def __init__(
        self, host_id: str, url: str, token: str, timeout: float = 10, api: int | None = None
    ) -> None:
        self.host_id = host_id
        self.api = api  # the host's API version (its report's); None: ours
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        # Passed on each request: a session's verify loses to REQUESTS_CA_BUNDLE.
        self._verify: str | bool = str(self.ca) if self.ca else True

    @classmethod
    def trust(cls, ca: Path | None) -> None:
        """The CA every client made from now on verifies https hosts with (None: the system's)."""
        cls.ca = ca

    def _call(
        self, method: str, path: str, *, timeout: float | None = None, **kw: Any
    ) -> requests.Response:
        if "json" in kw:  # a host one release behind reads its own version's number
            kw["json"] = at_version(kw["json"], self.api)
        try:
            r = self.session.request(
                method, self.url + path, timeout=timeout or self.timeout, verify=self._verify, **kw
            )
        except requests.exceptions.SSLError as e:
            tls = tls_error(e, f"host {self.host_id} ({self.url})", self.ca)
            log.warning("%s", tls.message if tls else f"TLS with {self.url} failed: {e}")
            raise HostUnreachable(
                f"host {self.host_id} is unreachable (TLS failed)",
                hint="the scheduler's log says why (its --ca must verify the host's certificate)",
            ) from e
        except requests.RequestException as e:
            log.debug("host %s (%s): %s %s: %s", self.host_id, self.url, method, path, e)
            raise HostUnreachable(
                f"host {self.host_id} is unreachable ({_why(e)})",
                hint="check that tt-hostd runs there (tt-scheduler -v logs the details)",
            ) from e
        if r.status_code >= 400:
            err = ErrorBody.decode(r.content, r.reason)
            if r.status_code == 400:
                raise BadInput(err.error, hint=err.hint)
            raise HostdError(err.error, hint=err.hint, status=r.status_code, kind=err.kind)
        return r

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", "/v1/host", timeout=5).json()
        return out

    def vms(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call("GET", "/v1/vms").json()
        return out

    def create_vm(self, req: VMRequest) -> dict[str, Any]:
        out: dict[str, Any] = self._call("POST", "/v1/vms", json=req.to_dict(), timeout=300).json()
        return out

    def egress(self, env: str) -> dict[str, Any]:
        """The ENV's egress on this host (mode, allow-list, denied connections and where to)."""
        out: dict[str, Any] = self._call("GET", f"/v1/envs/{env}/egress", timeout=3).json()
        return out

    def delete_vm(self, vm_id: str, commit_cache: bool = False) -> None:
        """commit_cache: the job succeeded, its cache clone becomes the newest version."""
        params = {"commit_cache": "1"} if commit_cache else {}
        try:
            self._call("DELETE", f"/v1/vms/{vm_id}", timeout=300, params=params)
        except HostdError as e:
            if e.status != 404:
                raise

    def caches(self) -> list[dict[str, Any]]:
        """The host's caches (hostd.cache.store.CacheStore.listing)."""
        out: list[dict[str, Any]] = self._call("GET", "/v1/caches", timeout=10).json()
        return out

    def delete_cache(self, scope_id: str) -> bool:
        """False when the host has no such cache."""
        try:
            self._call("DELETE", f"/v1/caches/{scope_id}", timeout=60)
        except HostdError as e:
            if e.status != 404:
                raise
            return False
        return True

    def exec(self, vm_id: str, req: ExecRequest) -> Iterator[ExecEvent]:
        """The command's events as hostd streams them."""
        r = self._call(
            "POST",
            f"/v1/vms/{vm_id}/exec",
            json=req.on_vm().to_dict(),
            stream=True,
            timeout=(10, None),  # type: ignore[arg-type]
        )
        try:
            # A line holds up to 1 MiB of output (1.4 MB of base64): read by 512 bytes, as
            # iter_lines does by default, joining the pieces costs ~0.5 s of CPU per line.
            for line in r.iter_lines(chunk_size=1 << 16):
                if line:
                    yield ExecEvent.from_dict(json.loads(line))
        except requests.RequestException as e:
            log.warning("host %s (%s) went away mid-command: %s", self.host_id, self.url, e)
            raise HostUnreachable(f"host {self.host_id} went away mid-command ({_why(e)})") from e
        finally:
            r.close()

    def image_manifest(self, name: str, digest: str) -> bytes:
        """The image's manifest.json as the host stores it (409: it has another build)."""
        params = {"digest": digest} if digest else {}
        return self._call("GET", f"/v1/images/{name}/manifest", params=params).content

    def image_file(self, name: str, rel: str, digest: str, byte_range: str) -> requests.Response:
        """One of the image's files as a stream from the host (byte_range: a Range header);
        the caller closes the response."""
        return self._call(
            "GET",
            f"/v1/images/{name}/files/{rel}",
            params={"digest": digest} if digest else {},
            headers={"Range": byte_range} if byte_range else {},
            stream=True,
            timeout=(10, 60),  # type: ignore[arg-type]
        )

    def fetch_image(self, name: str, digest: str) -> dict[str, Any]:
        """Ask the host to fetch the image from the pool now (202; 409: it has not joined)."""
        out: dict[str, Any] = self._call(
            "POST", "/v1/images/fetch", json={"name": name, "digest": digest}
        ).json()
        return out

    def push(self, vm_id: str, dest: str, tar: bytes) -> None:
        self._call("PUT", f"/v1/vms/{vm_id}/files", params={"dest": dest}, data=tar, timeout=600)

    def get(self, vm_id: str, path: str, limit: int) -> bytearray:
        """The VM's tar of path, read as it comes: past limit bytes, BadInput (and no more)."""
        r = self._call(
            "GET",
            f"/v1/vms/{vm_id}/files",
            params={"path": path},
            stream=True,
            timeout=(10, 600),  # type: ignore[arg-type]
        )
        buf = bytearray()
        try:
            for chunk in r.iter_content(1 << 20):
                buf += chunk
                if len(buf) > limit:
                    raise BadInput(
                        f"{path} in the VM is over the scheduler's limit of {limit} bytes",
                        hint="ask for less, or raise tt-scheduler's --max-files",
                    )
        except requests.RequestException as e:
            raise HostUnreachable(f"host {self.host_id} went away mid-transfer ({_why(e)})") from e
        finally:
            r.close()
        return buf


def _why(e: requests.RequestException) -> str:
    """A reason without addresses."""
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError):
        return "no connection"
    return type(e).__name__
