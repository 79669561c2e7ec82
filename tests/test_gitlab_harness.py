"""The runner harness itself, against a driver that is not ours (a tiny bash driver in the
style of GitLab's test_executor), and our driver's stages that need no VM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runner_executor.core.job import STAGES
from tests.cloudutil import free_port
from tests.gitlab.harness import Job, Runner

HERE = Path(__file__).resolve().parent
LOCAL = [str(HERE / "gitlab" / "local_driver.sh")]
OURS = [str(Path(sys.executable).parent / "tt-gitlab-executor")]


def test_harness_runs_a_third_party_driver_through_every_stage() -> None:
    job = Job(
        1,
        ['echo "value=$WEIRD"', 'test -f "$MY_FILE" && cat "$MY_FILE"'],
        variables={"WEIRD": "a 'quoted' \"value\" with\nnewline and ünïcode $HOME"},
        after_script=['echo "after: $CI_JOB_STATUS"'],
        cache=True,
        artifacts=True,
        file_variables={"MY_FILE": "file content"},
    )
    r = Runner(LOCAL).run_job(job)
    assert r.status == "success", r.text()
    assert r.stages() == list(STAGES)  # every stage, in the documented order
    assert "value=a 'quoted' \"value\" with\nnewline and ünïcode $HOME" in r.text()
    assert "file content" in r.text() and "after: success" in r.text()
    assert "Missing gitlab-runner. cache-extractor is disabled." in r.text()
    assert r.config["driver"] == {"name": "local-sh", "version": "1"}


def test_harness_maps_a_failing_script_and_skips_like_the_runner() -> None:
    r = Runner(LOCAL).run_job(Job(2, ["echo one", "exit 7", "echo never"], after_script=["true"]))
    assert (r.status, r.exit_code) == ("failed", 7)
    assert "never" not in r.text().replace("$ echo never", "")
    assert r.stages() == [
        "prepare_script",
        "get_sources",
        "build_script",
        "after_script",
        "cleanup_file_variables",
    ]
    assert [c.what for c in r.calls][-1] == "cleanup"


def test_harness_cancel_sends_term_to_the_group_then_after_script_runs() -> None:
    r = Runner(LOCAL, graceful_kill_timeout=5).run_job(
        Job(3, ["sleep 30"], after_script=['echo "status=$CI_JOB_STATUS"']),
        cancel_during="build_script",
        cancel_after_s=0.5,
    )
    assert r.status == "canceled"
    [build] = [c for c in r.of("run") if c.stage == "build_script"]
    assert build.signals[:2] == ["cancel", "TERM"] and build.seconds < 5
    assert "status=canceled" in r.text()


def test_our_config_stage_prints_what_the_runner_parses() -> None:
    env = {"TT_SERVER": f"127.0.0.1:{free_port()}", "TT_TOKEN": "x"}
    r = Runner(OURS, env=env, prepare_retry_delay=0).run_job(
        Job(4, ["true"], variables={"TT_OS": "debian-12", "TT_ARCH": "amd64"}),
    )
    [config, *_] = r.of("config")
    out = json.loads(config.stdout)
    assert out["builds_dir"] == "/builds" and out["cache_dir"] == "/cache"
    assert out["driver"]["name"] == "tt-ci" and out["builds_dir_is_shared"] is False
    # Nothing listens there: prepare is a system failure, retried three times, each with cleanup.
    assert r.status == "system_failure" and r.prepare_attempts == 3
    assert [c.what for c in r.calls] == ["config", "prepare", "cleanup"] * 3
    assert all(c.kind == "system" for c in r.of("prepare"))
    assert "cannot reach the scheduler" in r.text() and "hint:" in r.text()


def test_our_driver_refuses_a_job_without_a_target_as_a_build_failure() -> None:
    r = Runner(OURS, env={"TT_SERVER": f"127.0.0.1:{free_port()}", "TT_TOKEN": "x"}).run_job(
        Job(5, ["true"])
    )
    assert (r.status, r.exit_code, r.prepare_attempts) == ("failed", 1, 1)
    assert "the job names no target" in r.text() and "TT_OS and TT_ARCH" in r.text()


def test_our_driver_with_no_scheduler_configured_is_a_system_failure(tmp_path: Path) -> None:
    r = Runner(OURS, env={"TT_CONFIG": str(tmp_path / "none.json")}, prepare_retry_delay=0).run_job(
        Job(6, ["true"], image="debian-12:arm64")
    )
    assert r.status == "system_failure" and r.prepare_attempts == 3
    assert "no scheduler configured" in r.text()


def test_harness_kills_a_driver_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = tmp_path / "stubborn.sh"
    stubborn.write_text("#!/bin/bash\ntrap '' TERM\n[ \"$1\" = prepare ] && sleep 30\nexit 0\n")
    stubborn.chmod(0o755)
    r = Runner(
        [str(stubborn)], prepare_exec_timeout=0.5, graceful_kill_timeout=0.5, prepare_retry_delay=0
    ).run_job(Job(7, ["true"]))
    assert r.status == "system_failure" and r.prepare_attempts == 3
    assert all(c.signals == ["TERM", "KILL"] and c.rc is None for c in r.of("prepare"))
