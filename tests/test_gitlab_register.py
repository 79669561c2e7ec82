"""`tt gitlab register` with real python-gitlab against a loopback GitLab stand-in that checks
every request against GitLab's documented API; the config.toml it writes, parsed by tomllib."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner_executor.core.runner_toml import RunnerSection, merge
from tests.gitlab.standin import Standin, serving

TT = str(Path(sys.executable).parent / "tt")
PAT, ADMIN = "glpat-user-token-abc", "glpat-admin-token-xyz"


@pytest.fixture
def gitlab() -> Iterator[Standin]:
    with serving({PAT: False, ADMIN: True}) as st:
        yield st
    assert st.violations == []


def _tt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TT, "gitlab", "register", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_project_runner_is_created_and_config_toml_written(gitlab: Standin, tmp_path: Path) -> None:
    cfg = tmp_path / "gitlab-runner" / "config.toml"
    r = _tt(
        "--url", gitlab.url, "--project", "42", "--tag", "tt-ci", "--tag", "vm",
        "--config", str(cfg), "--tt-config", "/etc/gitlab-runner/tt.json",
        "--max-memory", "4096", "--executor", "/usr/local/bin/tt-gitlab-executor",
        env={"GITLAB_TOKEN": PAT},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [runner] = gitlab.runners
    assert f"runner {runner['id']} created" in r.stdout
    assert runner["token"] not in r.stdout + r.stderr  # the token goes only into the file
    assert PAT not in r.stdout + r.stderr
    # What python-gitlab really sent: auth, then the new-workflow runner creation.
    assert [(q["method"], q["path"]) for q in gitlab.requests] == [
        ("GET", "/api/v4/user"),
        ("POST", "/api/v4/user/runners"),
    ]
    assert all(q["token"] == PAT for q in gitlab.requests)
    assert gitlab.requests[1]["json"] == {
        "description": "tt-ci",
        "tag_list": ["tt-ci", "vm"],
        "run_untagged": False,
        "runner_type": "project_type",
        "project_id": 42,
    }
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    doc = tomllib.loads(cfg.read_text())
    assert doc["concurrent"] == 4
    [section] = doc["runners"]
    assert section["token"] == runner["token"] and section["token"].startswith("glrt-")
    assert section["executor"] == "custom" and section["url"] == gitlab.url
    assert (section["builds_dir"], section["cache_dir"], section["shell"]) == (
        "/builds",
        "/cache",
        "bash",
    )
    custom = section["custom"]
    base = ["--tt-config", "/etc/gitlab-runner/tt.json", "--max-memory", "4096"]
    for stage in ("config", "prepare", "run", "cleanup"):
        assert custom[f"{stage}_exec"] == "/usr/local/bin/tt-gitlab-executor"
        assert custom[f"{stage}_args"] == [*base, stage]
    assert custom["graceful_kill_timeout"] > 0 and custom["cleanup_exec_timeout"] > 0

    # A second runner is appended; the first stays as it was.
    r = _tt("--url", gitlab.url, "--group", "7", "--config", str(cfg), "--token", PAT)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(cfg.read_text())
    assert [s["token"] for s in doc["runners"]] == [x["token"] for x in gitlab.runners]
    assert gitlab.requests[-1]["json"]["runner_type"] == "group_type"
    assert gitlab.requests[-1]["json"]["group_id"] == 7


def test_printed_section_is_valid_toml(gitlab: Standin) -> None:
    r = _tt("--url", gitlab.url, "--instance", "--token", ADMIN, "--run-untagged")
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    assert doc["runners"][0]["token"] == gitlab.runners[0]["token"]
    assert gitlab.requests[-1]["json"]["runner_type"] == "instance_type"
    assert "shown only once" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "1", "--token", "wrong"], "refused the token"),
        (["--instance", "--token", PAT], "refused to create the runner (403)"),
        (["--project", "404", "--token", PAT], "refused to create the runner (404)"),
    ],
)
def test_gitlab_refusals_are_explained(gitlab: Standin, args: list[str], message: str) -> None:
    r = _tt("--url", gitlab.url, *args)
    assert r.returncode == 1
    assert message in r.stderr and "hint:" in r.stderr
    assert PAT not in r.stderr and "wrong" not in r.stderr.replace("refused", "")
    assert gitlab.runners == []


def test_bad_input_before_any_request(gitlab: Standin, tmp_path: Path) -> None:
    r = _tt("--url", gitlab.url, "--project", "1", env={"GITLAB_TOKEN": ""})
    assert r.returncode == 2 and "no GitLab token" in r.stderr
    r = _tt("--url", "gitlab.example.com", "--project", "1", "--token", PAT)
    assert r.returncode == 2 and "is not an http(s) address" in r.stderr
    r = _tt("--url", gitlab.url, "--token", PAT)  # no scope
    assert r.returncode == 2 and "one of the arguments --project --group --instance" in r.stderr
    assert gitlab.requests == []


def test_unreachable_gitlab(tmp_path: Path) -> None:
    from tests.cloudutil import free_port

    r = _tt("--url", f"http://127.0.0.1:{free_port()}", "--project", "1", "--token", PAT)
    assert r.returncode == 1 and "cannot reach GitLab" in r.stderr


def test_toml_escapes_and_merge() -> None:
    s = RunnerSection('na"me ✓', "https://g.example", "glrt-x", "/opt/tt exe", ("--a", 'b"c'))
    doc = tomllib.loads(merge("", s.render(), 2))
    assert doc["runners"][0]["name"] == 'na"me ✓'
    assert doc["runners"][0]["custom"]["run_args"] == ["--a", 'b"c', "run"]
    kept = 'concurrent = 10\nlog_level = "info"\n'
    doc = tomllib.loads(merge(kept, s.render(), 2))
    assert doc["concurrent"] == 10 and doc["log_level"] == "info"
