"""tt-github-webhooks as an operator meets it: help for every verb and flag, and clear errors
(what is wrong, how to fix it) for missing secrets, credentials and files."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from webhooks.cli import make_parser

BIN = Path(sys.executable).parent


def test_every_verb_and_flag_has_help() -> None:
    parser = make_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"{name} has no help"
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TT_GH_")}
    return subprocess.run(
        [BIN / "tt-github-webhooks", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def test_serve_without_a_secret_says_how_to_set_it(tmp_path: Path) -> None:
    r = _run("serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:7439")
    assert r.returncode == 1
    assert "no webhook secret" in r.stderr and "TT_GH_WEBHOOK_SECRET" in r.stderr


def test_serve_without_credentials_says_which_to_give(tmp_path: Path) -> None:
    r = _run(
        "serve",
        "--state-dir",
        str(tmp_path),
        "--listen",
        "127.0.0.1:7439",
        env={"TT_GH_WEBHOOK_SECRET": "s3cret-value"},
    )
    assert r.returncode == 1 and "no GitHub credentials" in r.stderr and "TT_GH_TOKEN" in r.stderr
    assert "s3cret-value" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--app-id", "1", "--app-key-file", "/nonexistent/key.pem"], "cannot read the App key"),
        (["--listen", "nowhere"], "--listen"),
        (["--push-runner", "/nonexistent"], "run.sh does not exist"),
    ],
)
def test_serve_bad_input_is_named(tmp_path: Path, args: list[str], words: str) -> None:
    r = _run(
        "serve",
        "--state-dir",
        str(tmp_path),
        *args,
        env={"TT_GH_WEBHOOK_SECRET": "x", "TT_GH_TOKEN": "ghp_x"},
    )
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_jobs_without_state_points_at_the_flag(tmp_path: Path) -> None:
    r = _run("jobs", "--state-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "--state-dir" in r.stderr


def test_old_limit_flags_are_accepted_and_say_what_replaces_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--max-vms/--max-per-owner still parse (old unit files keep working); the service warns
    that TT CI's quotas replaced them, naming the command for its own scheduler user."""
    from ttci.infra.settings import resolve
    from webhooks.cli import _warn_deprecated

    class Sched:
        def status(self) -> dict[str, object]:
            return {"user": "github"}

    a = make_parser().parse_args(["serve", "--max-vms", "20", "--max-per-owner", "10"])
    resolve(a)
    assert (a.max_vms, a.max_per_owner) == (20, 10)
    with caplog.at_level("WARNING", logger="webhooks"):
        _warn_deprecated(a, Sched())  # type: ignore[arg-type]
    text = caplog.text
    assert "--max-vms 20 is deprecated and ignored" in text
    assert "tt user quota github --vms 20" in text
    assert "tt user quota --project github:OWNER/REPO --vms 10" in text
    caplog.clear()
    plain = make_parser().parse_args(["serve"])
    resolve(plain)
    _warn_deprecated(plain, Sched())  # type: ignore[arg-type]
    assert caplog.text == ""
