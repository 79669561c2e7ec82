"""The console script `tt-hostd` and the `tt image` verbs as `tt` finds them, both started
without importing the host's libraries first: `tt --help` stays light, and an install without
the host part (`pip install 'ttci[host]'`) says so instead of printing a traceback."""

from __future__ import annotations

import argparse
from typing import Any

from ttci.infra.extras import MissingExtra, explain, launch
from ttci.infra.settings import resolve

__all__ = ["main", "make_parser", "register_image"]


def main(argv: list[str] | None = None) -> int:
    """`tt-hostd`."""
    return launch("hostd.cli.main", "tt-hostd", "host", argv)


class _ImageHelp(argparse.Action):
    """`tt image --help`: the real verbs' help (the host's modules are imported only now)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the image verbs and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        try:
            image = _image_parser()
        except MissingExtra as e:
            parser.exit(1, f"error: {e.message}\n  hint: {e.hint}\n")
        image.parse_args(["image", "--help"])


def register_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tt image ...` (the ttci.commands entry point): a stand-in parser that hands the
    verb's words to hostd's image commands when it runs."""
    p = sub.add_parser(
        "image",
        help="build, check, list and warm guest images (on a host; `tt image --help`)",
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_ImageHelp)
    p.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_image)


def _image_parser() -> argparse.ArgumentParser:
    try:
        from hostd.cli import image_cmd  # noqa: PLC0415 - the host's libraries, only now
    except ImportError as e:
        raise explain(e, "tt image", "host") or e from None
    p = argparse.ArgumentParser(prog="tt")
    image_cmd.register_pool(p.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    return p


def _run_image(args: argparse.Namespace) -> int:
    inner = _image_parser().parse_args(["image", *args.words])
    for key, value in vars(args).items():  # -v and the like, given before `image`
        if key not in ("words", "func"):
            inner.__dict__.setdefault(key, value)
    resolve(inner)  # the image verbs' settings (flag > environment > default)
    result: int = inner.func(inner)
    return result


def make_parser() -> argparse.ArgumentParser:
    """The program's parser (the host's libraries are imported for it)."""
    from hostd.cli.main import make_parser as real  # noqa: PLC0415

    return real()
