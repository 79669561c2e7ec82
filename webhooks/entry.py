"""The console script `tt-github-webhooks`: an install without the GitHub part says which pip
command adds it (pip install 'ttci[github]') instead of printing a traceback."""

from __future__ import annotations

from ttci.infra.extras import launch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return launch("webhooks.cli", "tt-github-webhooks", "github", argv)
