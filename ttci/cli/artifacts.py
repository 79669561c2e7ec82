"""Tar archives `tt job run` moves: the working directory or a git ref going in, a script,
and artifacts coming back out."""

from __future__ import annotations

import base64
import fnmatch
import io
import tarfile
import time
from pathlib import Path

from ttci.infra.proc import run
from ttci.model.errors import BadInput, TTError

__all__ = ["empty_tar", "extract_b64", "git_archive", "script_tar", "tar_dir"]


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


def extract_b64(data: str, dest: Path) -> None:
    """Unpack a base64 tar (as the scheduler returns files) into dest, safely."""
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(data))) as tar:
        tar.extractall(dest, filter="data")
