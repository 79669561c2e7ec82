"""The install's parts: which optional extra brings which library, and clear errors when one is
missing (the base install is the client: `tt` and `tt-gitlab-executor`, with rich and requests).

    pip install ttci                  the client
    pip install 'ttci[host]'          tt-hostd (libvirt-python, pyroute2, Flask, ...)
    pip install 'ttci[scheduler]'     tt-scheduler
    pip install 'ttci[github]'        tt-github-webhooks
    pip install 'ttci[gitlab]'        tt gitlab register (python-gitlab)

`launch` runs a console script whose module needs an extra; `require` checks for one before a
command starts (without importing it); `explain` turns an ImportError of a library an extra
brings into a TTError naming the pip command.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable

from ttci.model.errors import TTError

__all__ = ["EXTRAS", "MissingExtra", "explain", "launch", "pip_hint", "require"]

_WEB = ("flask", "waitress", "cheroot", "sqlite_utils", "prometheus_client")
# extra -> the import names of the libraries it brings (pyproject.toml lists the packages).
EXTRAS: dict[str, tuple[str, ...]] = {
    "host": ("libvirt", "pyroute2", "yaml", *_WEB),
    "scheduler": ("flask_wtf", *_WEB),
    "github": ("github", *_WEB),
    "gitlab": ("gitlab",),
}


class MissingExtra(TTError):
    """A command needs a part of TT CI that this install lacks."""


def pip_hint(extra: str) -> str:
    return f"pip install 'ttci[{extra}]'"


def _error(what: str, extra: str, module: str) -> MissingExtra:
    return MissingExtra(
        f"{what} needs the {extra} part of TT CI ({module} is not installed)",
        hint=f"{pip_hint(extra)} (or `make install` in a checkout)",
    )


def explain(e: ImportError, what: str, extra: str) -> MissingExtra | None:
    """The MissingExtra for an ImportError of one of the extra's libraries; None for another
    import error (a bug, or a broken library: raise it as it is)."""
    top = (e.name or "").split(".", maxsplit=1)[0]
    return _error(what, extra, top) if top and top in EXTRAS[extra] else None


def require(extra: str, what: str, modules: Iterable[str] | None = None) -> None:
    """Raise MissingExtra unless the extra's libraries (or just `modules`) are installed;
    nothing is imported."""
    for name in EXTRAS[extra] if modules is None else modules:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            raise _error(what, extra, name)


def launch(module: str, program: str, extra: str, argv: list[str] | None = None) -> int:
    """Import `module` and run its main(argv); a missing library of `extra` is one clear line
    on stderr (exit 1), not a traceback."""
    try:
        main: Callable[[list[str] | None], int] = importlib.import_module(module).main
    except ImportError as e:
        err = explain(e, program, extra)
        if err is None:
            raise
        print(f"{program}: error: {err.message}\n  hint: {err.hint}", file=sys.stderr)
        return 1
    return main(argv)
