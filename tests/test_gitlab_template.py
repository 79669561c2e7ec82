"""The shipped `.gitlab-ci.yml`, checked by real parsers: GitLab's CI schema (check-jsonschema
`vendor.gitlab-ci`) and gitlab-ci-local expanding the matrix the way GitLab does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostd.builders.image_recipe import DEFAULT_TARGETS
from runner_executor.core import job

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "ci-templates" / "gitlab" / ".gitlab-ci.yml"
NODE_BIN = ROOT / "tools" / "node_modules" / ".bin"
BIN = Path(sys.executable).parent
IMAGES = [f"qemu:{r}:{a.value}" for r, a in DEFAULT_TARGETS]


def _schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.gitlab-ci", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def _list_jobs(template: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    if not (NODE_BIN / "gitlab-ci-local").exists():
        pytest.fail("gitlab-ci-local is missing: run `make tools`")
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copy(template, repo / ".gitlab-ci.yml")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    env = {**os.environ, "PATH": f"{NODE_BIN}:{os.environ['PATH']}"}  # Node 22 first
    return subprocess.run(
        [NODE_BIN / "gitlab-ci-local", "--list-json"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_template_passes_gitlabs_schema() -> None:
    r = _schema(TEMPLATE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_matrix_expands_to_exactly_the_targets_that_have_images(tmp_path: Path) -> None:
    r = _list_jobs(TEMPLATE, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [j["name"] for j in json.loads(r.stdout[r.stdout.index("[") :])]
    assert names == [
        "build: [debian-12,amd64]",
        "build: [debian-12,arm64]",
        "build: [debian-13,amd64]",
        "build: [debian-13,arm64]",
        "build: [debian-12,i386]",
        "build: [debian-12,armhf]",
        "build: [debian-12,ppc64el]",
        "build: [debian-12,s390x]",
        "build: [debian-14,riscv64]",
        "test-arm64",
    ]
    # Each matrix job's TT_OS/TT_ARCH is a target the driver resolves to a default image, and
    # every default image is covered: no unsupported pair, none missing.
    picked = set()
    for name in names[:-1]:
        m = re.fullmatch(r"build: \[(.+),(.+)\]", name)
        assert m
        t = job.target({"TT_OS": m[1], "TT_ARCH": m[2]})
        picked.add(job.pick_image(t, IMAGES))
    assert picked == set(IMAGES)
    assert job.pick_image(job.target({"CI_JOB_IMAGE": "debian-12:arm64"}), IMAGES)


def test_parsers_reject_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(TEMPLATE.read_text().replace("  stage: build\n", "  stagez: build\n"))
    r = _schema(broken)
    assert r.returncode == 1
    r = _list_jobs(broken, tmp_path)
    assert r.returncode == 1 and "'stagez' property is not expected" in r.stdout + r.stderr
