"""Checks of the code's own structure: lint, types, help texts (layering: test_layers.py)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_check() -> None:
    r = subprocess.run([BIN / "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = subprocess.run(
        [BIN / "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = subprocess.run([BIN / "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _walk(parser: "object", path: list[str]) -> list[tuple[list[str], object]]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    out: list[tuple[list[str], object]] = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join([*path, name])} has no help text"
                out += _walk(sub, [*path, name])
    return out


SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_and_flag_has_help(script: str) -> None:
    import importlib

    mod = importlib.import_module(SCRIPTS[script].split(":")[0])
    for path, parser in _walk(mod.make_parser(), [script]):
        for action in parser._actions:  # type: ignore[attr-defined]
            if action.option_strings and action.dest not in ("help", "version"):
                assert action.help, f"{' '.join(path)} {action.option_strings} has no help"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_are_installed_with_help_and_version(script: str) -> None:
    r = subprocess.run([BIN / script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    r = subprocess.run([BIN / script, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{script} "), r.stdout + r.stderr
