"""The install's parts: the built wheel installs the client alone into a fresh venv (no gcc, no
libvirt-dev: only rich and requests come from the package index), `tt --help` and
`tt-gitlab-executor --help` work there, and every command of a part that is missing says which
`pip install 'ttci[...]'` adds it. In the full install, `tt --help` imports no host library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (not "*cache*": that would drop ttci/model/cache.py, hostd/cache/ and the cache verbs)
NOT_SOURCE = (
    *(".git", ".venv", "build", "node_modules", "test-artifacts", "*.egg-info"),
    *("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"),
)
HEAVY = ("libvirt", "pyroute2", "flask", "waitress", "cheroot", "sqlite_utils", "github", "gitlab")


def _run(
    argv: list[str], cwd: str = "/", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TT_", "PYTHON"))}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_the_base_install_is_the_client() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("=")[0].strip().lower() for d in meta["dependencies"]}
    assert base == {"rich", "requests"}
    extras = meta["optional-dependencies"]
    assert {"host", "scheduler", "github", "gitlab", "dev"} <= set(extras)
    assert any(d.startswith("libvirt-python") for d in extras["host"])
    assert any(d.startswith("python-gitlab") for d in extras["gitlab"])
    assert any(d.startswith("PyGithub") for d in extras["github"])
    makefile = (ROOT / "Makefile").read_text()
    assert ".[host,scheduler,github,gitlab,dev]" in makefile


def test_tt_help_imports_no_host_library() -> None:
    """In the full install too: the `tt image` verbs import hostd only when they run."""
    code = (
        "import sys\n"
        "from ttci.cli.main import make_parser\n"
        "make_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = _run([sys.executable, "-c", code], cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel built from this tree, installed with its base dependencies only."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(src)])
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp.glob("ttci-*.whl")
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env)
    r = _run([str(env / "bin/python"), "-m", "pip", "install", "-q", str(wheel)])
    assert r.returncode == 0, r.stderr[-3000:]
    yield env


@pytest.mark.e2e
def test_the_wheel_installs_the_client_alone(client_venv: Path) -> None:
    py = str(client_venv / "bin/python")
    r = _run([py, "-m", "pip", "list", "--format=freeze"])
    installed = {line.split("==")[0].lower() for line in r.stdout.split()}
    assert {"ttci", "rich", "requests"} <= installed
    assert not installed & {"libvirt-python", "pyroute2", "flask", "pygithub", "python-gitlab"}
    for argv in (["tt", "--help"], ["tt-gitlab-executor", "--help"], ["tt", "env", "--help"]):
        r = _run([str(client_venv / "bin" / argv[0]), *argv[1:]])
        assert r.returncode == 0, f"{argv}: {r.stderr}"
        assert "usage:" in r.stdout
    r = _run([str(client_venv / "bin/tt"), "--version"])
    assert r.stdout.startswith("tt ")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["tt-hostd", "serve", "--help"], "host"),
        (["tt-scheduler", "--help"], "scheduler"),
        (["tt-github-webhooks", "serve", "--help"], "github"),
        (["tt", "image", "list", "--local"], "host"),
        (["tt", "image", "--help"], "host"),
        (["tt", "up"], "host"),
        (
            ["tt", "gitlab", "register", "--url", "http://127.0.0.1:9", "--project", "1"],
            "gitlab",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_missing_part_names_its_pip_command(
    client_venv: Path, argv: list[str], extra: str
) -> None:
    r = _run(
        [str(client_venv / "bin" / argv[0]), *argv[1:]],
        env={"PATH": "/usr/bin:/bin", "HOME": str(client_venv), "GITLAB_TOKEN": "x"},
    )
    assert r.returncode != 0
    assert f"pip install 'ttci[{extra}]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
