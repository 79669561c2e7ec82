"""The console script `tt-scheduler`: an install without the scheduler part says which pip
command adds it (pip install 'ttci[scheduler]') instead of printing a traceback."""

from __future__ import annotations

import argparse

from ttci.infra.extras import launch

__all__ = ["main", "make_parser"]


def main(argv: list[str] | None = None) -> int:
    return launch("ttci.scheduler.web.serve", "tt-scheduler", "scheduler", argv)


def make_parser() -> argparse.ArgumentParser:
    """The program's parser (the host's libraries are imported for it)."""
    from ttci.scheduler.web.serve import make_parser as real  # noqa: PLC0415

    return real()
