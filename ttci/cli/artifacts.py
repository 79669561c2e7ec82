"""Tar archives `tt job run` and `tt env get` move: the working directory or a git ref going in,
a script, and files coming back out of a guest.

A guest is untrusted: what it sends back is unpacked only when every member is the one thing
asked for (the top-level name of the guest path, or below it), a plain file or a directory with
a relative path that stays inside, and the whole fits max_bytes. Anything else (links, devices,
FIFOs, sparse files, absolute or `..` paths, extra members such as `.git/hooks/...`) refuses
the whole archive before a byte is written: UnsafeArchive. Files land in a directory the user
named, which must be new or empty unless they allow overwriting (fresh_dir).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import io
import tarfile
import time
from pathlib import Path, PurePosixPath

from ttci.infra.proc import run
from ttci.infra.settings import SETTINGS, env_text
from ttci.model.errors import BadInput, TTError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "UnsafeArchive",
    "archive_root",
    "check_members",
    "empty_tar",
    "extract_b64",
    "extract_requested",
    "fresh_dir",
    "git_archive",
    "max_files",
    "script_tar",
    "tar_dir",
]

DEFAULT_MAX_BYTES = 1 << 30  # what one get may bring back (the scheduler's default cap too)


def max_files() -> int:
    """tt's cap on what one get brings back: TT_MAX_FILES (MiB, or a size such as 4G)."""
    text = env_text("max-files")
    if not text:
        return DEFAULT_MAX_BYTES
    mib: int = SETTINGS["max-files"].parse(text, "TT_MAX_FILES")
    return mib << 20


class UnsafeArchive(TTError):
    """A guest's archive holds something never unpacked here (nothing was written)."""


def script_tar(script: tuple[str, bytes]) -> bytes:
    """A tar holding one executable file (name, content)."""
    name, content = script
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(content), 0o755, int(time.time())
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def empty_tar() -> bytes:
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    return buf.getvalue()


def tar_dir(root: Path, excludes: list[str]) -> bytes:
    """The working directory as a tar (its contents at the top), minus excluded names."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = info.name.removeprefix("./")
        if rel != "." and any(
            fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(Path(rel).name, pat) for pat in excludes
        ):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".", filter=keep)
    return buf.getvalue()


def git_archive(ref: str, repo: Path) -> bytes:
    """`git archive REF` of the repository at repo: a clean checkout of that ref."""
    try:
        return run(["git", "-C", str(repo), "archive", "--format=tar", ref]).stdout
    except TTError as e:
        raise BadInput(
            f"cannot check out --git-ref {ref!r} here: {e.message}",
            hint="run in a git repository and name a commit, branch or tag it has",
        ) from e


def archive_root(guest_path: str) -> str:
    """The one top-level name a get of guest_path may hold (hostd tars `-C PARENT NAME`):
    `/root/work/out/a.txt` -> `a.txt`, `/var/log/` -> `log`, `/` -> `.` (anything)."""
    name = PurePosixPath(guest_path.rstrip("/") or "/").name
    return name or "."


def _refuse(member: str, why: str) -> UnsafeArchive:
    shown = member if len(member) <= 200 else member[:200] + "..."
    return UnsafeArchive(
        f"the guest's archive holds {shown!r}, {why}: nothing was unpacked",
        hint="the VM sent something other than the requested path; check what runs in it",
    )


def check_members(tar: tarfile.TarFile, want: str, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member, checked (see the module's words); UnsafeArchive at the first bad one."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        name = m.name
        if not name or "\0" in name or name.startswith("/"):
            raise _refuse(name, "an absolute or empty path")
        parts = PurePosixPath(name).parts
        if ".." in parts:
            raise _refuse(name, "a path that climbs out with ..")
        if want != "." and (not parts or parts[0] != want):
            raise _refuse(name, f"which was not requested (only {want!r} was)")
        if m.issym() or m.islnk():
            raise _refuse(name, f"a link (to {m.linkname[:200]!r})")
        if m.issparse() or not (m.isreg() or m.isdir()):
            raise _refuse(name, "a device, FIFO or other special file")
        total += m.size
        if total > max_bytes:
            raise UnsafeArchive(
                f"the guest's archive unpacks to more than {max_bytes} bytes: nothing was unpacked",
                hint="ask for less, or allow more (TT_MAX_FILES)",
            )
        members.append(m)
    return members


def extract_requested(data: bytes, dest: Path, want: str, max_bytes: int) -> None:
    """Unpack a guest's tar into dest (created), only if every member passes check_members.

    Raises:
        UnsafeArchive: a member that is never unpacked (then nothing was), or not a tar.
        TTError: writing failed (disk full, permissions).
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # no decompression
            members = check_members(tar, want, max_bytes)
            dest.mkdir(parents=True, exist_ok=True)
            for m in members:  # the data filter also refuses what resolves outside dest
                tar.extract(m, dest, filter="data")
    except tarfile.FilterError as e:  # e.g. dest already held a link leading out
        raise UnsafeArchive(
            f"refused to unpack into {dest}: {e}", hint="unpack into a new, empty directory"
        ) from None
    except tarfile.TarError as e:
        raise UnsafeArchive(
            f"the guest's answer is not a usable tar archive: {e}", hint="the guest is broken"
        ) from None
    except OSError as e:
        raise TTError(f"cannot write into {dest}: {e.strerror or e}") from None


def extract_b64(data: str, dest: Path, want: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """extract_requested for a base64 tar (as the scheduler returns files)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UnsafeArchive(
            f"the answer is not base64: {e}", hint="the scheduler is broken"
        ) from None
    extract_requested(raw, dest, want, max_bytes)


def fresh_dir(path: Path, overwrite: bool, flag: str) -> None:
    """Files from guests land in a directory that is new or empty, unless overwrite (BadInput
    otherwise, before anything is asked of a VM)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BadInput(f"{path} exists and is not a directory", hint=f"name another {flag}")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise BadInput(
            f"{path} is not empty: files from a VM go into a new or empty directory",
            hint=f"name another {flag}, empty this one, or pass --overwrite to add to it",
        )
