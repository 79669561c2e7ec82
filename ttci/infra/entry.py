"""Every entry point's edge: logging, signals, and errors turned into messages and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from ttci.infra.log import setup_logging
from ttci.infra.settings import resolve
from ttci.model.errors import BadInput, TTError

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "run_cli"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so ExitStacks unwind: no half image, mount or VM stays.
    raise KeyboardInterrupt(f"signal {signum}")


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    setup_logging(verbose=getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, _terminate)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        resolve(args)  # the settings' values: flag > environment > config file > default
        return func(args)
    except BadInput as e:
        print(f"error: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_USAGE
    except TTError as e:
        print(f"error: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tt ... | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
