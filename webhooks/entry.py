"""The console script `tt-github-webhooks`: an install without the GitHub part says which pip
command adds it (pip install 'ttci[github]') instead of printing a traceback."""

from __future__ import annotations

import argparse

from ttci.infra.extras import launch

__all__ = ["main", "make_parser"]


def main(argv: list[str] | None = None) -> int:
    return launch("webhooks.cli", "tt-github-webhooks", "github", argv)


def make_parser() -> argparse.ArgumentParser:
    """The program's parser (the host's libraries are imported for it)."""
    from webhooks.cli import make_parser as real  # noqa: PLC0415

    return real()
