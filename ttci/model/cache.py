"""Cache volumes, pure: the `KEY:/path` grammar, where a cache may be mounted, and its scope.

A job asks for a cache by KEY and a mount path in its guest (`tt env add --cache deps:/cache`,
GitLab's `TT_CACHE`, GitHub's `tt-cache-KEY` label). The key is scoped: the stored cache is
(owner, project, KEY), so one project never mounts another's. hostd names a cache's files by
`scope_id` (a hash of the scope), never by the key text itself, so no KEY can reach a path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ttci.model.errors import BadInput

__all__ = [
    "CACHE_HINT",
    "KEY_RE",
    "CacheScope",
    "CacheSpec",
    "check_cache_path",
    "check_key",
    "parse_cache",
]

KEY_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_PATH_RE = re.compile(r"\A(/[A-Za-z0-9_.+@-]+)+\Z")
CACHE_HINT = "write KEY:/path, e.g. deps:/cache (KEY: 1-64 letters, digits, _ . -; path absolute)"
# Where a cache disk may not go: the guest's own system (exactly these or anything under them).
_SYSTEM = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
_SYSTEM_MORE = ("/libx32", "/boot", "/run", "/var/lib/dpkg", "/var/lib/apt", "/usr/lib/tt-agent")
# Mounting over these would hide what the guest needs; a folder below them is fine.
_NOT_ITSELF = ("/var", "/tmp", "/root", "/home", "/opt", "/srv", "/mnt", "/media", "/var/tmp")


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key) or ".." in key:
        raise BadInput(f"cache key {key!r:.80} is not valid", hint=CACHE_HINT)
    return key


def check_cache_path(path: str) -> str:
    """An absolute, plain mount path outside the guest's system folders."""
    if len(path) > 200 or not _PATH_RE.fullmatch(path):
        raise BadInput(
            f"cache path {path!r:.80} is not an absolute path of plain names",
            hint="use letters, digits and _ . + @ - between slashes, e.g. /cache or /root/.cache",
        )
    parts = path.split("/")[1:]
    if any(p in (".", "..") for p in parts):
        raise BadInput(f"cache path {path!r} has . or .. in it", hint="write the path plainly")
    for system in (*_SYSTEM, *_SYSTEM_MORE):
        if path == system or path.startswith(system + "/"):
            raise BadInput(
                f"cache path {path} is inside the guest's system folder {system}",
                hint="mount caches elsewhere, e.g. /cache or /root/.cache",
            )
    if path in _NOT_ITSELF:
        raise BadInput(
            f"cache path {path} would hide the guest's own {path}",
            hint=f"use a folder below it, e.g. {path}/cache",
        )
    return path


@dataclass(frozen=True)
class CacheSpec:
    """What a job asks for: a cache KEY mounted at path in each of its VMs."""

    key: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "path": self.path}

    @classmethod
    def from_dict(cls, d: Any) -> CacheSpec:
        if isinstance(d, str):
            return parse_cache(d)
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            raise BadInput(f"cache {d!r:.80} is malformed", hint='send {"key": ..., "path": ...}')
        path = d.get("path")
        if not isinstance(path, str):
            raise BadInput(f"cache {d['key']!r:.80} has no path", hint=CACHE_HINT)
        return cls(check_key(d["key"]), check_cache_path(path))

    def text(self) -> str:
        return f"{self.key}:{self.path}"


def parse_cache(text: str) -> CacheSpec:
    """`KEY:/path` -> CacheSpec, or BadInput saying what is wrong."""
    key, sep, path = text.strip().partition(":")
    if not sep:
        raise BadInput(f"cache {text!r:.80} has no ':/path'", hint=CACHE_HINT)
    return CacheSpec(check_key(key), check_cache_path(path))


@dataclass(frozen=True)
class CacheScope:
    """The stored identity of a cache: its owner (the account that made the ENV), the CI project
    ("gitlab:group/proj", "github:owner/repo", or "user:NAME" for the command line) and KEY."""

    owner: str
    project: str
    key: str

    @property
    def scope_id(self) -> str:
        """The cache's name on disk: a hash of the scope (no text of it reaches a path)."""
        raw = "\0".join((self.owner, self.project, self.key)).encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def to_dict(self) -> dict[str, str]:
        return {"owner": self.owner, "project": self.project, "key": self.key}

    @classmethod
    def from_dict(cls, d: Any) -> CacheScope:
        if not isinstance(d, dict) or not all(
            isinstance(d.get(k), str) and 0 < len(d[k]) <= 300 for k in ("owner", "project", "key")
        ):
            raise BadInput(f"cache scope {d!r:.100} is malformed", hint="send owner, project, key")
        return cls(d["owner"], d["project"], check_key(d["key"]))
