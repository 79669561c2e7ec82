"""Which cache a GitHub job's VM mounts: its repository's entry in the service's `--cache-file`
(TOML, the same per-repository pattern as `--egress-file`):

    [repos."octo/app"]
    cache = "deps:/cache"     # KEY:/path; the key is the repository's own (github:octo/app)

A job of a repository without an entry gets no cache. Its VM's clone is committed when GitHub
says the job concluded `success`; any other conclusion discards it. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ttci.model.cache import CacheSpec, parse_cache
from ttci.model.errors import BadInput

__all__ = ["job_cache", "parse_cache_file"]


def parse_cache_file(doc: Mapping[str, Any]) -> dict[str, CacheSpec]:
    """The `[repos."OWNER/NAME"]` tables of a cache file; BadInput names what is wrong."""
    repos = doc.get("repos", {})
    if not isinstance(repos, dict) or set(doc) - {"repos"}:
        raise BadInput(
            'the cache file holds only [repos."OWNER/NAME"] tables',
            hint='e.g. [repos."octo/app"] cache = "deps:/cache"',
        )
    out = {}
    for repo, entry in repos.items():
        if "/" not in repo or not isinstance(entry, dict) or set(entry) != {"cache"}:
            raise BadInput(
                f"cache file: [repos.{repo!r}] is not OWNER/NAME with cache = KEY:/path",
                hint='cache = "deps:/cache"',
            )
        if not isinstance(entry["cache"], str):
            raise BadInput(f"cache file: {repo}'s cache must be text", hint='"deps:/cache"')
        try:
            out[repo.lower()] = parse_cache(entry["cache"])
        except BadInput as e:
            raise BadInput(f"cache file: {repo}: {e.message}", hint=e.hint) from None
    return out


def job_cache(repo: str, repos: Mapping[str, CacheSpec]) -> CacheSpec | None:
    return repos.get(repo.lower())
