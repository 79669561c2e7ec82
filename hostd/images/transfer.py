"""Images travel: fetch an image another host has, instead of building it.

An image is content-addressed by its manifest: every file's size and sha256, and the digest of
those (`Manifest.digest`). A pull

- stages the image in `IMAGE_PATH/.pull-<dir>/` (a dot directory: the catalogue never offers
  it), the manifest byte for byte as the source has it;
- takes each file from a local image that already holds the same bytes (same sha256), else
  from the source, into `FILE.part`, resuming a part left by a cut connection or a killed
  process with an HTTP Range request (the part's bytes are hashed again first);
- hashes every byte as it arrives; a file whose size or sha256 is not the manifest's is deleted
  and the pull refused (TransferCorrupt): nothing of it is ever offered;
- moves the whole directory into place in one rename when every file is verified, so the
  running hostd's catalogue (scanned on every call) has it at once and its next heartbeat
  reports it to the scheduler.

Sources: the scheduler (`HttpSource`, which streams from a host that has the image: hosts never
learn each other's addresses or tokens) and a directory (`DirSource`: another image path, a
mounted disk). A bandwidth cap (bytes/s) paces the reads; progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.images.catalogue import Image, check_dir, scan
from hostd.images.fs import atomic_replace_dir, free_bytes, safe_rmtree
from hostd.images.sources import (
    CHUNK,
    Source,
    SourceRefused,
    TransferBusy,
    TransferCorrupt,
    TransferError,
)
from ttci.model.errors import BadInput, ImageError
from ttci.model.manifest import MANIFEST_FILE, FileEntry, Manifest
from ttci.model.naming import ImageName

__all__ = ["Progress", "PullResult", "pull", "remove_partial"]

log = logging.getLogger("hostd.images.transfer")
STAGING = ".pull-"
RETRIES = 5  # connection failures per file before the pull gives up (each resumes)
MIN_FREE_AFTER = 1 << 30  # a pull leaves at least this much free under the image path


@dataclass(frozen=True)
class Progress:
    image: str
    file: str
    done: int  # bytes of the whole image in place (verified, reused or received)
    total: int
    rate: float  # bytes/s received by this pull so far
    resumed_at: int = 0  # where the current file's download resumed (0: from the start)


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    path: Path
    fetched: int  # bytes received from the source by this pull
    reused: int  # bytes taken from local images with the same content
    resumed: int  # bytes an earlier, interrupted pull had staged (not fetched again)
    seconds: float
    already: bool = False  # the same image was here: nothing done
    reconnects: tuple[int, ...] = ()  # where this pull resumed after its connection broke

    @property
    def rate(self) -> float:
        return self.fetched / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "digest": self.manifest.digest,
            "path": str(self.path),
            "bytes": sum(f.size for f in self.manifest.files()),
            "fetched": self.fetched,
            "reused": self.reused,
            "resumed": self.resumed,
            "reconnects": list(self.reconnects),
            "seconds": round(self.seconds, 3),
            "rate_mib_s": round(self.rate / (1 << 20), 1),
            "already": self.already,
        }


class _Pacer:
    """Holds reads to `rate` bytes/s (0: no cap) and reports progress at most twice a second."""

    def __init__(self, rate: float, report: Callable[[int], None]) -> None:
        self.rate = rate
        self.report = report
        self.start = time.monotonic()
        self.received = 0
        self._shown = 0.0

    def took(self, n: int) -> None:
        self.received += n
        now = time.monotonic()
        if self.rate > 0:
            ahead = self.received / self.rate - (now - self.start)
            if ahead > 0:
                time.sleep(ahead)
                now = time.monotonic()
        if now - self._shown >= 0.5:
            self._shown = now
            self.report(self.received)

    def speed(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.received / elapsed if elapsed > 0 else 0.0


def _hash_file(path: Path) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def _local_copies(image_path: Path) -> dict[tuple[int, str], Path]:
    """Files of whole local images by (size, sha256): the bytes a pull need not fetch."""
    images, _ = scan(image_path)
    return {(f.size, f.sha256): i.file(f.path) for i in images for f in i.manifest.files()}


@contextlib.contextmanager
def _pull_lock(image_path: Path, dirname: str) -> Iterator[None]:
    with (image_path / f"{STAGING}{dirname}.lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferBusy(
                f"another pull of {dirname} runs on this host", hint="wait for it to finish"
            ) from None
        yield


class _Pull:
    """One pull's state: where it stages, what it received, how it reports."""

    def __init__(
        self,
        source: Source,
        manifest: Manifest,
        staging: Path,
        rate: float,
        on_progress: Callable[[Progress], None],
    ) -> None:
        self.source = source
        self.m = manifest
        self.staging = staging
        self.pacer = _Pacer(rate, self.progress)
        self.on_progress = on_progress
        self.total = sum(f.size for f in manifest.files())
        self.done = 0  # bytes of finished files
        self.reused = 0
        self.resumed = 0
        self.reconnects: list[int] = []
        self.current = ""
        self.resumed_at = 0
        self.file_done = 0

    def progress(self, _received: int = 0) -> None:
        self.on_progress(
            Progress(
                self.m.name,
                self.current,
                self.done + self.file_done,
                self.total,
                self.pacer.speed(),
                self.resumed_at,
            )
        )

    def file(self, f: FileEntry, local: Path | None) -> None:
        final = self.staging / f.path
        if final.is_file() and final.stat().st_size == f.size:
            self.done += f.size  # verified and renamed by an earlier attempt
            self.resumed += f.size
            return
        self.current, self.file_done, self.resumed_at = f.path, 0, 0
        part = self.staging / f"{f.path}.part"
        if local is not None and self._copy(local, part, f):
            self.reused += f.size
        else:
            self._download(f, part)
        part.chmod(0o444)
        part.rename(final)
        self.done += f.size
        self.file_done = 0
        self.progress()

    def _copy(self, local: Path, part: Path, f: FileEntry) -> bool:
        """The same bytes from a local image (verified like received ones); False: fetch."""
        h = hashlib.sha256()
        try:
            with local.open("rb") as src, part.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                os.fsync(dst.fileno())
        except OSError as e:
            log.warning("cannot copy %s from %s (%s): fetching it", f.path, local, e.strerror)
            part.unlink(missing_ok=True)
            return False
        if h.hexdigest() != f.sha256:
            log.warning("local %s is not what its manifest says: fetching %s", local, f.path)
            part.unlink(missing_ok=True)
            return False
        log.info("%s: %s taken from %s (same sha256)", self.m.name, f.path, local)
        return True

    def _download(self, f: FileEntry, part: Path) -> None:
        for attempt in range(RETRIES + 1):
            offset = part.stat().st_size if part.exists() else 0
            if offset > f.size:
                part.unlink()
                offset = 0
            if offset and attempt:
                self.reconnects.append(offset)
            elif offset:
                self.resumed += offset  # staged by an earlier pull
            try:
                self._receive(f, part, offset)
                return
            except TransferCorrupt:
                raise
            except SourceRefused:
                raise
            except TransferError as e:
                if attempt == RETRIES:
                    raise
                wait = min(2.0**attempt, 30.0)
                log.warning("%s: %s (%s); resuming in %.0f s", self.m.name, f.path, e, wait)
                time.sleep(wait)

    def _receive(self, f: FileEntry, part: Path, offset: int) -> None:
        h = _hash_file(part) if offset else hashlib.sha256()
        if offset:
            self.resumed_at = offset
            log.info("%s: resuming %s at %d of %d bytes", self.m.name, f.path, offset, f.size)
        self.file_done = offset
        if offset < f.size:
            with (
                self.source.open(self.m.name, self.m.digest, f.path, offset) as chunks,
                part.open("ab") as out,
            ):
                for chunk in chunks:
                    if self.file_done + len(chunk) > f.size:
                        break  # more than the manifest says: caught below
                    out.write(chunk)
                    h.update(chunk)
                    self.file_done += len(chunk)
                    self.pacer.took(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        size = part.stat().st_size
        if size < f.size:
            raise TransferError(f"{f.path}: the source sent {size} of {f.size} bytes")
        if size != f.size or h.hexdigest() != f.sha256:
            part.unlink()
            raise TransferCorrupt(
                f"{self.m.name}: {f.path} from {self.source.where} is not what the manifest "
                f"says (sha256 {h.hexdigest()[:16]}..., manifest {f.sha256[:16]}...): refused, "
                "the image is not offered",
                hint="the source's copy is damaged: check it (tt image check) or rebuild it there",
            )


def _existing(final: Path) -> Image | None:
    try:
        return check_dir(final) if final.is_dir() else None
    except ImageError:
        return None


def pull(
    image_path: Path,
    name: str,
    source: Source,
    *,
    digest: str = "",
    rate: float = 0,
    on_progress: Callable[[Progress], None] | None = None,
    replace: bool = False,
) -> PullResult:
    """Fetch image `name` (with `digest`, if given) from source into image_path, verified.

    Raises:
        TransferBusy: another pull of it runs here. TransferCorrupt: a file's bytes are not
        the manifest's (deleted; nothing offered). TransferError: the source failed or
        refused (what was staged stays and the next pull resumes it). BadInput: a different
        image of that name is here (replace=False), or too little disk.
    """
    t0 = time.monotonic()
    dirname = ImageName.parse(name).dirname
    image_path.mkdir(parents=True, exist_ok=True)
    with _pull_lock(image_path, dirname):
        raw = source.manifest(name, digest)
        m = _parse_manifest(raw, name, digest, source.where)
        final = image_path / dirname
        here = _existing(final)
        if here is not None and here.manifest.digest == m.digest:
            return PullResult(m, final, 0, 0, 0, time.monotonic() - t0, already=True)
        if final.exists() and not replace:
            raise BadInput(
                f"another {name} is here ({final}{'' if here else ', broken'})",
                hint="pass --replace to put the fetched one in its place",
            )
        staging = image_path / f"{STAGING}{dirname}"
        _stage(staging, raw, m)
        _check_space(image_path, staging, m)
        copies = _local_copies(image_path)
        job = _Pull(source, m, staging, rate, on_progress or _quiet)
        for f in sorted(m.files(), key=lambda f: f.size):
            job.file(f, copies.get((f.size, f.sha256)))
        _still_free(final, m, replace)
        atomic_replace_dir(staging, final)
        took = time.monotonic() - t0
        result = PullResult(
            m,
            final,
            job.pacer.received,
            job.reused,
            job.resumed,
            took,
            reconnects=tuple(job.reconnects),
        )
        _log_result(result, source.where)
        return result


def _log_result(r: PullResult, where: str) -> None:
    log.info(
        "%s: fetched from %s and verified in %.1f s (%d MiB received at %.1f MiB/s, "
        "%d MiB reused, %d MiB resumed, %d reconnects)",
        r.manifest.name,
        where,
        r.seconds,
        r.fetched >> 20,
        r.rate / (1 << 20),
        r.reused >> 20,
        r.resumed >> 20,
        len(r.reconnects),
    )


def _still_free(final: Path, m: Manifest, replace: bool) -> None:
    """A build of the name that finished while we fetched is not replaced unasked (the
    verified staging stays: `--replace` puts it in place without fetching again)."""
    if final.exists() and not replace:
        here = _existing(final)
        if here is None or here.manifest.digest != m.digest:
            raise BadInput(
                f"another {m.name} appeared at {final} while it was fetched",
                hint="pass --replace to put the fetched one in its place",
            )


def _quiet(_p: Progress) -> None:
    return None


def _parse_manifest(raw: bytes, name: str, digest: str, where: str) -> Manifest:
    try:
        m = Manifest.from_dict(json.loads(raw))
    except ValueError as e:
        raise TransferCorrupt(f"the manifest of {name} from {where} is not JSON: {e}") from e
    if m.name != str(ImageName.parse(name)):
        raise TransferCorrupt(f"{where} sent the manifest of {m.name} for {name}")
    if digest and m.digest != digest:
        raise TransferCorrupt(
            f"{where} sent a manifest of {name} with digest {m.digest[:16]}..., "
            f"not {digest[:16]}...",
            hint="the image changed on its hosts meanwhile: pull again",
        )
    for f in m.files():
        if "/" in f.path or f.path.startswith(".") or f.path == MANIFEST_FILE:
            raise TransferCorrupt(f"the manifest of {name} names a bad file path {f.path!r}")
    return m


def _stage(staging: Path, raw: bytes, m: Manifest) -> None:
    """staging holds this manifest (a staging of another build of the name is dropped)."""
    old = staging / MANIFEST_FILE
    if old.exists() and old.read_bytes() != raw:
        log.info("%s: dropping a partial pull of another build", m.name)
        safe_rmtree(staging)
    staging.mkdir(exist_ok=True)
    tmp = staging / f".{MANIFEST_FILE}.tmp"
    tmp.write_bytes(raw)
    tmp.rename(staging / MANIFEST_FILE)


def _check_space(image_path: Path, staging: Path, m: Manifest) -> None:
    have = sum(p.stat().st_size for p in staging.iterdir() if p.is_file())
    need = sum(f.size for f in m.files()) - have
    free = free_bytes(image_path)
    if free - need < MIN_FREE_AFTER:
        raise BadInput(
            f"{m.name} needs {need >> 20} MiB more under {image_path}, which has {free >> 20} "
            "MiB free",
            hint="free some space (tt image prune) or use a bigger --image-path",
        )


def remove_partial(image_path: Path) -> list[Path]:
    """Staged pulls nobody is running (each would resume, but nobody asked): removed."""
    removed: list[Path] = []
    if not image_path.is_dir():
        return removed
    for staging in sorted(image_path.glob(f"{STAGING}*")):
        if not staging.is_dir():
            continue
        try:
            with _pull_lock(image_path, staging.name.removeprefix(STAGING)):
                safe_rmtree(staging)
                removed.append(staging)
        except TransferBusy:
            continue
    return removed
