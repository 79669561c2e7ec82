"""The gitlab-runner `config.toml` section that wires a runner to tt-gitlab-executor. Pure.

Keys from the runner's `common.CustomConfig` and `[[runners]]`
(docs/facts/gitlab-custom-executor.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from runner_executor.core import job

__all__ = ["RunnerSection", "merge"]


def _s(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML for the strings we write)."""
    return json.dumps(value, ensure_ascii=False)


def _arr(values: Sequence[str]) -> str:
    return "[" + ", ".join(_s(v) for v in values) + "]"


@dataclass(frozen=True)
class RunnerSection:
    name: str
    url: str
    token: str  # glrt-...: secret, written only into the file (mode 0600) or printed once
    executor_path: str
    driver_args: tuple[str, ...] = ()  # e.g. --tt-config PATH --max-memory 8192
    limit: int = 0  # jobs at once for this runner (0: no limit)
    prepare_timeout_s: int = 3600  # prepare includes the wait in TT CI's admission queue
    cleanup_timeout_s: int = 600
    graceful_kill_timeout_s: int = 30

    def render(self) -> str:
        exe, a = _s(self.executor_path), list(self.driver_args)
        lines = [
            "[[runners]]",
            f"  name = {_s(self.name)}",
            f"  url = {_s(self.url)}",
            f"  token = {_s(self.token)}",
            '  executor = "custom"',
            f"  builds_dir = {_s(job.BUILDS_DIR)}",
            f"  cache_dir = {_s(job.CACHE_DIR)}",
            '  shell = "bash"',
        ]
        if self.limit:
            lines.append(f"  limit = {int(self.limit)}")
        lines += [
            "  [runners.custom]",
            f"    config_exec = {exe}",
            f"    config_args = {_arr([*a, 'config'])}",
            f"    prepare_exec = {exe}",
            f"    prepare_args = {_arr([*a, 'prepare'])}",
            f"    prepare_exec_timeout = {int(self.prepare_timeout_s)}",
            f"    run_exec = {exe}",
            f"    run_args = {_arr([*a, 'run'])}",
            f"    cleanup_exec = {exe}",
            f"    cleanup_args = {_arr([*a, 'cleanup'])}",
            f"    cleanup_exec_timeout = {int(self.cleanup_timeout_s)}",
            f"    graceful_kill_timeout = {int(self.graceful_kill_timeout_s)}",
            "    force_kill_timeout = 10",
        ]
        return "\n".join(lines) + "\n"


def merge(existing: str, section: str, concurrent: int) -> str:
    """config.toml with the new [[runners]] appended; a new file gets a `concurrent` line.

    Top-level keys must come before the first table, so an existing file keeps its own.
    """
    if not existing.strip():
        return f"concurrent = {int(concurrent)}\ncheck_interval = 0\n\n{section}"
    return existing.rstrip("\n") + "\n\n" + section
