"""GitLab jobs for real: the runner harness drives `tt-gitlab-executor` against `tt up`'s stack,
and the runner's kinds of generated bash run inside fresh VMs of two architectures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner_executor.core.job import STAGES
from tests.cloudutil import leftovers, qemu_pids, small_cloud, tt
from tests.conftest import built_image
from tests.gitlab.harness import Job, Runner
from ttci.cli.allinone import Stack

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
DRIVER = str(Path(sys.executable).parent / "tt-gitlab-executor")
WEIRD = "spaces  and 'single' \"double\" $dollar `tick` \\back\nsecond line ✓ ünï"
SECRET = "s3cr3t-masked-value-42"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    built_image("debian-12", "amd64")
    built_image("debian-12", "arm64")
    built_image("debian-12", "ppc64el")  # the slowest cold boot: asked cold, it outlasts a timeout
    state = tmp_path_factory.mktemp("glcloud")
    with small_cloud(state, cpu_total=4, mem_total=4096) as stack:
        yield stack, state / "client.json"


def _runner(cfg: Path, **kw: object) -> Runner:
    return Runner(
        [DRIVER, "--memory", "384", "--max-memory", "2048"],
        env={"TT_CONFIG": str(cfg)},
        prepare_retry_delay=0,
        **kw,  # type: ignore[arg-type]
    )


def _result(stack: Stack, env: str) -> str:
    """The outcome the driver reported into the scheduler's job history."""
    from ttci.client.config import ClientConfig
    from ttci.client.scheduler import Client

    jobs = Client(ClientConfig(stack.scheduler, stack.token)).get("/v1/jobs")
    return str(next(j for j in jobs if j["env"] == env)["result"])


def _no_envs(cfg: Path) -> None:
    assert json.loads(tt("env", "list", "--json", config=cfg).stdout) == []


def test_matrix_job_on_amd64_runs_every_stage_in_a_fresh_vm(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    job = Job(
        101,
        [
            "uname -m",
            'printf "%s" "$WEIRD" | sha256sum',
            'test "$(cat "$CONFIG_FILE")" = "from a file variable"',
            'echo "cwd=$(pwd)"',
            "seq 1 200000 | tail -n 1",
            "seq 1 100000",
            'test -n "$MY_SECRET"',
            'echo "big=${#BIG1}+${#BIG2}"',
        ],
        variables={
            "TT_OS": "debian-12",
            "TT_ARCH": "amd64",
            "WEIRD": WEIRD,
            "MY_SECRET": SECRET,
            # together they make every stage script too big for one argv string: sent on stdin
            "BIG1": "x" * 60_000,
            "BIG2": "y" * 60_000,
        },
        masked={"MY_SECRET"},
        after_script=['echo "after_script sees $CI_JOB_STATUS"'],
        cache=True,
        artifacts=True,
        file_variables={"CONFIG_FILE": "from a file variable"},
        steps={"Release": ['echo "step sees $TT_ARCH"', "head -c 6000000 /dev/zero | base64"]},
    )
    r = _runner(cfg).run_job(job)
    text = r.text()
    assert r.status == "success", text
    # every stage in the documented order, and a step_* name the driver has never seen
    assert r.stages() == [*STAGES[:5], "step_release", *STAGES[5:]]
    [step] = [c for c in r.of("run") if c.stage == "step_release"]
    assert step.stdout.count(b"A") >= 8_000_000  # 8 MB of output flooded through, all of it
    assert "\nx86_64\n" in text
    import hashlib

    assert hashlib.sha256(WEIRD.encode()).hexdigest() in text  # byte-exact into the VM
    assert "big=60000+60000" in text
    assert "cwd=/builds/group/project" in text and "after_script sees success" in text
    assert "step sees amd64" in text
    assert "git version" in text and "Missing gitlab-runner. cache-archiver is disabled." in text
    # 100,000 lines streamed through: every one, in order.
    [build] = [c for c in r.of("run") if c.stage == "build_script"]
    lines = build.stdout.decode().splitlines()
    numbers = [ln for ln in lines if ln.isdigit()]
    assert numbers[0] == "200000" and numbers[1:] == [str(i) for i in range(1, 100001)]
    assert SECRET not in text  # the driver never prints variables itself
    assert "is up on host local" in text and "ready in" in text
    _no_envs(cfg)
    assert _result(stack, "gl-101") == "success"
    # cleanup is idempotent: a second call finds nothing and still succeeds
    env = {
        **os.environ,
        "TT_CONFIG": str(cfg),
        "CUSTOM_ENV_CI_JOB_ID": "101",
        "SYSTEM_FAILURE_EXIT_CODE": "2",
    }
    again = subprocess.run([DRIVER, "cleanup"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "ENV gl-101 was already gone" in again.stderr
    assert leftovers(stack.state_dir) == []


def test_arm64_job_from_image_fails_with_its_exit_code(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    job = Job(
        102,
        ["uname -m", "echo failing now", "exit 3", "echo not reached"],
        image="debian-12:arm64",
        after_script=['echo "after_script sees $CI_JOB_STATUS"'],
        artifacts=True,
    )
    r = _runner(cfg).run_job(job)
    text = r.text()
    assert (r.status, r.exit_code) == ("failed", 3), text
    assert "\naarch64\n" in text and "TCG: emulated" in text
    assert "after_script sees failed" in text
    assert "\nnot reached" not in text
    assert r.stages()[-2:] == ["upload_artifacts_on_failure", "cleanup_file_variables"]
    _no_envs(cfg)
    assert _result(stack, "gl-102") == "failed"
    assert leftovers(stack.state_dir) == []


def _guest_sleepers() -> str:
    return (
        "n=0; for p in /proc/[0-9]*; do "
        'case "$(tr "\\0" " " < $p/cmdline 2>/dev/null)" in "sleep 300"*) n=$((n+1));; esac; '
        'done; echo "sleepers=$n"'
    )


def test_cancel_stops_the_script_in_the_vm_and_shows_the_origin(
    cloud: tuple[Stack, Path],
) -> None:
    stack, cfg = cloud
    shown: list[dict[str, object]] = []

    def watch() -> None:  # while the job runs, the ENV is visible to operators with its origin
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not shown:
            r = tt("env", "show", "gl-103", "--json", config=cfg)
            if r.returncode == 0 and json.loads(r.stdout)["state"] == "ready":
                shown.append(json.loads(r.stdout))
            time.sleep(0.5)

    t = threading.Thread(target=watch)
    t.start()
    job = Job(
        103,
        ["echo started", "sleep 300", "echo never"],
        variables={"TT_OS": "debian-12", "TT_ARCH": "x86_64"},
        after_script=[f'echo "after_script sees $CI_JOB_STATUS"; {_guest_sleepers()}'],
    )
    r = _runner(cfg, graceful_kill_timeout=30).run_job(
        job, cancel_during="build_script", cancel_after_s=4
    )
    t.join()
    text = r.text()
    assert r.status == "canceled", text
    [build] = [c for c in r.of("run") if c.stage == "build_script"]
    assert build.signals == ["cancel", "TERM"] and build.seconds < 15  # no SIGKILL needed
    assert "after_script sees canceled" in text and "sleepers=0" in text
    assert "stopping the script in the VM" in text
    assert _result(stack, "gl-103") == "cancelled"
    assert shown and shown[0]["origin"] == {
        "kind": "gitlab",
        "job": "103",
        "url": "https://gitlab.example.test/group/project/-/jobs/103",
        "project": "group/project",
        "runner": "tt-ci test runner",
    }
    _no_envs(cfg)
    assert leftovers(stack.state_dir) == []


def test_job_timeout_and_a_lost_vm_leave_nothing(cloud: tuple[Stack, Path]) -> None:
    stack, cfg = cloud
    # The job's timeout hits during build_script: TERM to the driver, nothing else runs.
    r = _runner(cfg, graceful_kill_timeout=30).run_job(
        Job(104, ["sleep 300"], image="debian-12", after_script=["echo after"]),
        kill_during="build_script",
        cancel_after_s=3,
    )
    assert r.status == "timeout", r.text()
    assert r.stages()[-1] == "build_script" and r.calls[-1].what == "cleanup"
    _no_envs(cfg)

    # The VM dies mid-script: a system failure with a message, and cleanup still deletes.
    def kill_vm() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = tt("env", "show", "gl-105", "--json", config=cfg)
            if r.returncode == 0 and json.loads(r.stdout)["state"] == "ready":
                time.sleep(3)
                for pid in qemu_pids(str(stack.state_dir)):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    t = threading.Thread(target=kill_vm)
    t.start()
    r = _runner(cfg).run_job(
        Job(105, ["echo started; sleep 300"], variables={"TT_OS": "debian-12", "TT_ARCH": "amd64"})
    )
    t.join()
    assert r.status == "system_failure", r.text()
    [build] = [c for c in r.of("run") if c.stage == "build_script"]
    assert build.kind == "system" and "VM was lost" in r.text()
    assert _result(stack, "gl-105") == "error"
    assert r.calls[-1].what == "cleanup" and r.calls[-1].rc == 0
    _no_envs(cfg)
    assert leftovers(stack.state_dir) == []


def test_prepare_timed_out_while_the_vm_boots_is_retried_and_leaves_nothing(
    cloud: tuple[Stack, Path],
) -> None:
    stack, cfg = cloud
    # ppc64el asked cold (TT_COLD): every attempt cold-boots (2-4 s under TCG), longer than the
    # timeout; a warm start (0.6 s) would beat it.
    variables = {"TT_OS": "debian-12", "TT_ARCH": "ppc64el", "TT_COLD": "1"}
    r = _runner(cfg, prepare_exec_timeout=1.5).run_job(Job(106, ["true"], variables=variables))
    assert r.status == "system_failure" and r.prepare_attempts == 3, r.text()
    for c in r.of("prepare"):
        assert c.signals == ["TERM"] and c.kind == "system"  # stopped at once, no SIGKILL
    assert "stopped the job (SIGTERM) while the VM was being created" in r.text()
    assert all(c.rc == 0 for c in r.of("cleanup"))
    _no_envs(cfg)
    assert leftovers(stack.state_dir) == []


@pytest.mark.parametrize(
    ("variables", "image", "message"),
    [
        ({"TT_OS": "debian-12", "TT_ARCH": "riscv64"}, "", "no host offers debian-12:riscv64"),
        ({}, "centos-7:amd64", "no host offers centos-7:amd64 (asked by image)"),
        ({"TT_OS": "debian-12", "TT_ARCH": "sparc"}, "", "unknown architecture 'sparc'"),
        ({"TT_ARCH": "arm64"}, "", "TT_OS is not set"),
        ({"TT_OS": "debian-12", "TT_MEMORY": "64G"}, "", "TT_MEMORY 65536 MiB is outside"),
        ({"TT_OS": "debian-12", "TT_CPUS": "lots"}, "", "TT_CPUS 'lots' is not a number"),
    ],
)
def test_bad_job_input_fails_the_job_clearly_without_a_vm(
    cloud: tuple[Stack, Path], variables: dict[str, str], image: str, message: str
) -> None:
    _, cfg = cloud
    r = _runner(cfg).run_job(Job(110, ["true"], variables=variables, image=image))
    assert (r.status, r.exit_code, r.prepare_attempts) == ("failed", 1, 1), r.text()
    assert message in r.text() and "hint:" in r.text()
    if "no host offers" in message:
        assert "debian-12:amd64" in r.text() and "debian-12:arm64" in r.text()
    assert r.stages() == []
    _no_envs(cfg)
