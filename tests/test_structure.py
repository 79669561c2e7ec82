"""Checks of the code's own structure: lint, layering, help texts, guest-side imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Pure modules: no I/O adapters may be imported by them (STYLE.md, rule 11).
PURE = [
    "ttci/arch.py",
    "ttci/naming.py",
    "ttci/manifest.py",
    "ttci/protocol.py",
    "ttci/errors.py",
    "hostd/images/recipe.py",
    "hostd/images/modules.py",
    "hostd/qemu.py",
    "hostd/domain_xml.py",
    "hostd/net/plan.py",
    "hostd/net/ruleset.py",
    "ttci/resources.py",
    "ttci/scheduler/placement.py",
    "ttci/scheduler/envspec.py",
]
FORBIDDEN = {
    "subprocess",
    "libvirt",
    "pyroute2",
    "flask",
    "gitlab",
    "github",
    "socket",
    "sqlite3",
    "sqlite_utils",
    "requests",
}
# What the guest gets: stdlib only, since the image has no venv.
GUEST = ["ttci/__init__.py", "ttci/protocol.py", "ttci/guest_agent.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_no_io(rel: str) -> None:
    bad = {m for m in _imports(ROOT / rel) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"{rel} imports {bad}"


@pytest.mark.parametrize("rel", GUEST)
def test_guest_code_is_stdlib_only(rel: str) -> None:
    stdlib = sys.stdlib_module_names | {"__future__", "ttci", "ttci.protocol"}
    bad = {m for m in _imports(ROOT / rel) if m.split(".")[0] not in stdlib and m not in stdlib}
    assert not bad, f"{rel} imports {bad}"


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


@pytest.mark.parametrize("module", ["ttci.cli", "hostd.cli"])
def test_every_command_and_flag_has_help(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    for path, parser in _walk(mod.make_parser(), [module]):
        for action in parser._actions:  # type: ignore[attr-defined]
            if action.option_strings and action.dest not in ("help", "version"):
                assert action.help, f"{' '.join(path)} {action.option_strings} has no help"


def test_console_scripts_are_installed() -> None:
    for name in ("tt", "tt-hostd"):
        r = subprocess.run([BIN / name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout
