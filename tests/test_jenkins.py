"""The Jenkinsfile template: parsed by a real Groovy 3 parser (PyPI groovy-parser), its matrix
checked against the images the cloud builds, and linted by npm-groovy-lint (CodeNarc).

Jenkins itself is not available offline (no jenkins.war in any registry here), so declarative
semantics beyond this are not checked; see docs/user/jenkins.md.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from groovy_parser.parser import digest_lark_tree, parse_groovy_content

from hostd.builders.image_recipe import DEFAULT_TARGETS
from ttci.model.arch import Arch
from ttci.model.naming import parse_release

ROOT = Path(__file__).resolve().parent.parent
JENKINSFILE = ROOT / "ci-templates" / "jenkins" / "Jenkinsfile"
LINT_CONFIG = JENKINSFILE.parent / ".groovylintrc.json"
TOOLS = ROOT / "tools" / "node_modules" / ".bin"
SERVED = {(release, arch.value) for release, arch in DEFAULT_TARGETS}


@dataclass
class Stmt:
    """One Jenkins DSL statement: `name 'arg', ... { children }`."""

    name: str
    args: list[str] = field(default_factory=list)
    children: list[Stmt] = field(default_factory=list)

    def find(self, name: str) -> Iterator[Stmt]:
        for c in self.children:
            if c.name == name:
                yield c
            yield from c.find(name)

    def one(self, name: str) -> Stmt:
        [s] = [c for c in self.children if c.name == name]
        return s


def _rules(node: dict[str, Any]) -> list[str]:
    rule = node.get("rule", [])
    return rule if isinstance(rule, list) else [rule]


def _statements(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for c in node.get("children", []):
        if {"block_statement", "script_statement"} & set(_rules(c)):
            yield c
        else:
            yield from _statements(c)


def _block(node: dict[str, Any]) -> dict[str, Any] | None:
    """The statement's closure block (first one, depth first)."""
    for c in node.get("children", []):
        if "block" in _rules(c):
            return c
        found = _block(c)
        if found is not None:
            return found
    return None


def _leaves(node: dict[str, Any], stop: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    if node is stop:
        return
    if "leaf" in node:
        yield node
    for c in node.get("children", []):
        yield from _leaves(c, stop)


def _stmt(node: dict[str, Any]) -> Stmt:
    block = _block(node)
    leaves = list(_leaves(node, block))
    names = [lf["value"] for lf in leaves if lf["leaf"].endswith("IDENTIFIER")]
    args = [lf["value"] for lf in leaves if lf["leaf"] == "STRING_LITERAL"]
    children = [_stmt(s) for s in _statements(block)] if block is not None else []
    return Stmt(names[0] if names else "", args, children)


@cache
def parse(text: str) -> Stmt:
    """Parse with the real Groovy grammar (raises on a syntax error), then read the DSL shape."""
    tree = digest_lark_tree(parse_groovy_content(text))
    return Stmt("<file>", [], [_stmt(s) for s in _statements(tree)])


def _axes(block: Stmt) -> dict[str, list[str]]:
    return {a.one("name").args[0]: a.one("values").args for a in block.find("axis")}


def _cells(matrix: Stmt) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(cells that run, cells excluded) as (OS, ARCH) pairs."""
    axes = _axes(matrix.one("axes"))
    every = set(itertools.product(axes["OS"], axes["ARCH"]))
    excluded: set[tuple[str, str]] = set()
    for ex in matrix.one("excludes").find("exclude"):
        e = _axes(ex)
        excluded |= set(itertools.product(e["OS"], e["ARCH"]))
    return every - excluded, excluded


def test_matrix_axes_are_targets_the_cloud_serves() -> None:
    top = parse(JENKINSFILE.read_text())
    [pipeline] = [s for s in top.children if s.name == "pipeline"]
    [matrix] = list(pipeline.find("matrix"))
    assert set(_axes(matrix.one("axes"))) == {"OS", "ARCH"}
    run, excluded = _cells(matrix)
    for os_name, arch in run | excluded:
        parse_release(os_name)  # a release the image builder knows
        Arch.parse(arch)  # a Debian architecture name, not an alias
        assert Arch.parse(arch).value == arch
    assert run <= SERVED, f"cells without an image: {sorted(run - SERVED)}"
    assert not excluded & SERVED, "an exclude drops a cell the cloud serves"
    assert len(run) >= 4 and {a for _, a in run} >= {"amd64", "arm64"}


def test_each_cell_runs_tt_job_run_for_its_own_target() -> None:
    top = parse(JENKINSFILE.read_text())
    [matrix] = list(top.find("matrix"))
    assert matrix.one("agent").one("label").args == ["tt"]
    [sh] = list(matrix.one("stages").find("sh"))
    script = " ".join(sh.args[0].split())
    assert 'tt job run --os "$OS" --arch "$ARCH"' in script
    assert "--timeout" in script and "-- ./ci/test.sh" in script
    token = matrix.one("environment").one("TT_TOKEN")  # TT_TOKEN = credentials('tt-ci-token')
    assert token.args == ["tt-ci-token"]


def test_a_syntax_error_is_caught_by_the_parser() -> None:
    broken = JENKINSFILE.read_text().rstrip().removesuffix("}")
    with pytest.raises(Exception, match="Unexpected") as e:
        parse(broken)
    assert type(e.value).__module__.startswith("lark")


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{TOOLS}:{os.environ['PATH']}"}  # Node 22 first
    return subprocess.run(
        [
            *(TOOLS / "npm-groovy-lint", "--noserver", "--config", LINT_CONFIG),
            *("--failon", "info", "--output", "txt", path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_npm_groovy_lint_passes_and_would_catch_a_broken_file(tmp_path: Path) -> None:
    # `make test` installs it (`make tools`): missing is a broken set-up, not a reason to skip.
    assert (TOOLS / "npm-groovy-lint").exists(), "npm-groovy-lint is missing: run `make tools`"
    r = _lint(JENKINSFILE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'Error'   │ 0" in r.stdout
    broken = tmp_path / "Jenkinsfile"
    broken.write_text(JENKINSFILE.read_text().rstrip().removesuffix("}"))
    r = _lint(broken)
    assert r.returncode == 1 and "NglParseError" in r.stdout + r.stderr
