"""The console script `tt-scheduler`: an install without the scheduler part says which pip
command adds it (pip install 'ttci[scheduler]') instead of printing a traceback."""

from __future__ import annotations

from ttci.infra.extras import launch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return launch("ttci.scheduler.web.serve", "tt-scheduler", "scheduler", argv)
