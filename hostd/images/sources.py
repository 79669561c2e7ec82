"""Where images are fetched from (hostd.images.transfer pulls them): the scheduler or a hostd
over HTTP (`HttpSource`), or a directory laid out like an image path (`DirSource`). And the
errors of a transfer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import requests

from ttci.model.errors import ImageError
from ttci.model.manifest import MANIFEST_FILE
from ttci.model.naming import ImageName

__all__ = [
    "CHUNK",
    "DirSource",
    "HttpSource",
    "Source",
    "SourceRefused",
    "TransferBusy",
    "TransferCorrupt",
    "TransferError",
]

CHUNK = 1 << 20


class TransferError(ImageError):
    """A pull failed; what it had staged stays for the next attempt to resume."""


class TransferCorrupt(TransferError):
    """A file's bytes are not the manifest's: deleted, the image not offered."""


class TransferBusy(TransferError):
    """Another pull of the same image runs on this host."""


class Source(Protocol):
    """Where images come from."""

    where: str  # for messages

    def manifest(self, name: str, digest: str) -> bytes:
        """The image's manifest.json as stored (digest "": whichever the source has)."""
        ...

    def open(
        self, name: str, digest: str, rel: str, offset: int
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """The file's bytes from offset on.

        Raises:
            TransferError: the source failed (the caller may retry and resume).
        """
        ...


class DirSource:
    """Images in a directory laid out like an image path (another host's, a mounted disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def _dir(self, name: str) -> Path:
        return self.path / ImageName.parse(name).dirname

    def manifest(self, name: str, digest: str) -> bytes:
        try:
            return (self._dir(name) / MANIFEST_FILE).read_bytes()
        except OSError as e:
            raise TransferError(
                f"no image {name} in {self.path}: {e.strerror}", hint="check the path"
            ) from None

    @contextlib.contextmanager
    def open(self, name: str, digest: str, rel: str, offset: int) -> Iterator[Iterator[bytes]]:
        try:
            f = (self._dir(name) / rel).open("rb")
        except OSError as e:
            raise TransferError(f"cannot read {rel} of {name}: {e.strerror}") from None
        with f:
            f.seek(offset)
            yield iter(lambda: f.read(CHUNK), b"")


class HttpSource:
    """The scheduler (or a hostd) over HTTP: GET /v1/images/NAME/manifest and
    /v1/images/NAME/files/REL with a Range header; ?digest= pins the content."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        verify: str | bool = True,
        timeout: tuple[float, float] = (10.0, 30.0),
    ) -> None:
        self.url = base_url.rstrip("/")
        self.where = self.url
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.verify = verify
        self.timeout = timeout

    def _get(self, path: str, **kw: Any) -> requests.Response:
        try:
            r = self.session.get(self.url + path, timeout=self.timeout, verify=self.verify, **kw)
        except requests.RequestException as e:
            raise TransferError(f"{self.where} did not answer: {type(e).__name__}") from e
        if r.status_code >= 400:
            try:
                err = r.json()
                msg, hint = str(err.get("error", r.reason)), err.get("hint")
            except ValueError:
                msg, hint = r.reason, None
            r.close()
            cls = TransferError if r.status_code >= 500 else SourceRefused
            raise cls(f"{self.where}: {r.status_code} {msg}", hint=hint)
        return r

    def get_json(self, path: str) -> Any:
        r = self._get(path)
        try:
            return r.json()
        except ValueError as e:
            raise TransferError(f"{self.where}{path} answered no JSON") from e

    def manifest(self, name: str, digest: str) -> bytes:
        r = self._get(f"/v1/images/{name}/manifest", params=_pin(digest))
        return r.content

    @contextlib.contextmanager
    def open(self, name: str, digest: str, rel: str, offset: int) -> Iterator[Iterator[bytes]]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        r = self._get(
            f"/v1/images/{name}/files/{rel}", params=_pin(digest), headers=headers, stream=True
        )
        try:
            if offset and r.status_code != 206:
                raise TransferError(f"{self.where} ignored the range request for {rel}")
            yield _chunks(r, self.where)
        finally:
            r.close()


class SourceRefused(TransferError):
    """The source refused (4xx): retrying the same request will not help."""


def _pin(digest: str) -> dict[str, str]:
    return {"digest": digest} if digest else {}


def _chunks(r: requests.Response, where: str) -> Iterator[bytes]:
    try:
        yield from r.iter_content(CHUNK)
    except requests.RequestException as e:
        raise TransferError(f"the connection to {where} broke: {type(e).__name__}") from e
