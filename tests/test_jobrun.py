"""`tt job run` for real: `tt up`'s stack, real VMs, the CLI as Jenkins runs it. Exit codes,
output, artifacts, a git ref, a matrix, Ctrl-C and SIGTERM, a timeout; nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloudutil import BIN, leftovers, small_cloud
from tests.conftest import built_image
from ttci.cli.allinone import Stack
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.infra.proc import stop
from ttci.wire.envs import EnvRequest
from ttci.wire.queue import WaitOptions

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path, Client]]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("jobrun-cloud")
    with small_cloud(state) as stack:
        client = Client(config.ClientConfig(stack.scheduler, stack.token))
        yield stack, state / "client.json", client


@pytest.fixture(scope="module")
def arm64() -> None:
    """The tests that run (or list) an arm64 target ask for its image themselves."""
    built_image("debian-12", "arm64")


def _env(cfg: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JENKINS_", "BUILD_"))}
    return {**env, "TT_CONFIG": str(cfg), **extra}


def _job(cfg: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "tt", "job", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(cfg, **env),
        timeout=300,
    )


def _jobs(client: Client) -> dict[str, dict[str, Any]]:
    return {j["env"]: j for j in client.get("/v1/jobs", limit=100)}


def _nothing_left(stack: Stack, client: Client) -> None:
    assert client.get("/v1/envs") == []
    assert leftovers(stack.state_dir) == []


def test_exit_code_output_artifacts_and_jenkins_origin(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    stack, cfg, client = cloud
    (tmp_path / "input.txt").write_text("from the workspace\n")
    r = _job(
        cfg,
        tmp_path,
        "--os",
        "debian-12",
        "--arch",
        "amd64",
        "--mem",
        "384",
        "--artifact",
        "out/report.txt",
        "--artifact",
        "logs",
        "--artifact",
        "missing.txt",
        "--",
        "cat input.txt; uname -m; echo oops >&2; mkdir -p out logs; pwd > out/report.txt;"
        " echo $CI $TT_JOB_ARCH > logs/a.log; exit 7",
        JENKINS_URL="https://jenkins.example.org/",
        BUILD_URL="https://jenkins.example.org/job/app/42/",
        JOB_NAME="app",
        BUILD_NUMBER="42",
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout == "from the workspace\nx86_64\n"  # the command's output, unprefixed
    assert "oops" in r.stderr and "exit 7" in r.stderr
    art = tmp_path / "tt-artifacts"  # never the working directory
    assert (art / "out" / "report.txt").read_text() == "/root/work\n"
    assert (art / "logs" / "a.log").read_text() == "true amd64\n"
    assert "artifact missing.txt not copied back" in r.stderr
    [job] = [j for j in _jobs(client).values() if j["origin"]["kind"] == "jenkins"]
    assert job["result"] == "failed" and job["deleted_at"]
    assert job["origin"]["url"] == "https://jenkins.example.org/job/app/42/"
    assert job["origin"]["job"] == "app #42 debian-12/amd64"
    _nothing_left(stack, client)


@pytest.mark.parametrize(
    ("sig", "arches"), [(signal.SIGINT, "amd64"), (signal.SIGTERM, "amd64,arm64")]
)
def test_interrupt_deletes_the_envs(
    arm64: None, cloud: tuple[Stack, Path, Client], tmp_path: Path, sig: signal.Signals, arches: str
) -> None:
    """Ctrl-C on one target; SIGTERM (a Jenkins abort) on a matrix of two."""
    stack, cfg, client = cloud
    proc = subprocess.Popen(
        [
            *(BIN / "tt", "job", "run", "--os", "debian-12", "--arch", arches, "--mem", "384"),
            *("--no-copy", "--", "echo started; sleep 600"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cfg),
    )
    try:
        assert proc.stdout is not None
        for _ in arches.split(","):  # the command runs in every VM now
            assert proc.stdout.readline().endswith("started\n")
        envs = [e["name"] for e in client.get("/v1/envs")]
        assert len(envs) == len(arches.split(","))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, grace=0)
    assert proc.returncode == 130, err
    jobs = _jobs(client)
    for name in envs:
        assert f"ENV {name} deleted" in err
        assert jobs[name]["result"] == "cancelled"
    assert "could not delete" not in err
    _nothing_left(stack, client)


def test_timeout_kills_the_command_and_cleans_up(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    stack, cfg, client = cloud
    t0 = time.monotonic()
    r = _job(
        cfg,
        tmp_path,
        *("--os", "debian-12", "--arch", "amd64", "--mem", "384", "--timeout", "10s"),
        *("--no-copy", "--", "echo begin; sleep 600; echo never"),
    )
    assert r.returncode == 124, r.stderr
    assert time.monotonic() - t0 < 120
    assert r.stdout == "begin\n"
    assert "timed out after 10 s" in r.stderr
    _nothing_left(stack, client)


def test_matrix_with_git_ref_prefixed_output_and_summary(
    arm64: None, cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    stack, cfg, client = cloud
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "VERSION").write_text("committed\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for args in (["init", "-q"], ["add", "VERSION"], ["commit", "-qm", "v1"]):
        subprocess.run([*git, *args], check=True)
    (repo / "VERSION").write_text("uncommitted edit\n")  # --git-ref ships the commit, not this
    r = _job(
        cfg,
        repo,
        *("--os", "debian-12", "--arch", "amd64,arm64", "--mem", "384", "--git-ref", "HEAD"),
        *("--artifact", "arch.txt", "--"),
        "cat VERSION; uname -m | tee arch.txt; [ $(uname -m) != aarch64 ] || exit 5",
    )
    assert r.returncode == 5, r.stderr
    lines = r.stdout.splitlines()
    for label, machine in (("debian-12/amd64", "x86_64"), ("debian-12/arm64", "aarch64")):
        assert f"[{label}] committed" in lines
        assert f"[{label}] {machine}" in lines
    assert "│ debian-12/amd64 │" in r.stderr and "│ ok " in r.stderr and "│ exit 5 " in r.stderr
    art = repo / "tt-artifacts"
    assert (art / "debian-12-amd64" / "arch.txt").read_text() == "x86_64\n"
    assert (art / "debian-12-arm64" / "arch.txt").read_text() == "aarch64\n"
    results = sorted(j["result"] for j in _jobs(client).values() if "debian-12-a" in j["env"])
    assert "success" in results and "failed" in results
    _nothing_left(stack, client)


def test_unknown_target_names_what_exists(
    arm64: None, cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    _, cfg, client = cloud
    r = _job(cfg, tmp_path, "--os", "debian-99", "--arch", "amd64", "--", "true")
    assert r.returncode == 2
    assert "no image serves --os debian-99 --arch amd64" in r.stderr
    assert "debian-12/arm64" in r.stderr  # the hint lists the targets this cloud has
    assert client.get("/v1/envs") == []


def _wait_queued(client: Client, n: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows: list[dict[str, Any]] = client.get("/v1/queue")
        if len(rows) >= n:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"nothing queued after {timeout} s: {client.get('/v1/envs')}")


def test_a_busy_cloud_queues_the_job_max_wait_ends_it_ctrl_c_withdraws_it(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    """A blocker ENV holds the cloud's memory: the job waits in the queue (its place printed);
    past --max-wait it exits 75 with nothing run; Ctrl-C while queued leaves nothing; without a
    limit it runs as soon as the blocker is deleted."""
    stack, cfg, client = cloud
    [host] = client.get("/v1/hosts")
    free = host["total"]["memory_mib"] - 200  # less than the job's 384 MiB stays free
    client.create_env(
        EnvRequest("blocker", "qemu:debian-12:amd64", memory_mib=free, life_s=900),
        wait=WaitOptions(wait=False),
    )
    job = ("--os", "debian-12", "--arch", "amd64", "--mem", "384", "--no-copy")
    try:
        t0 = time.monotonic()
        r = _job(cfg, tmp_path, *job, "--max-wait", "4s", "--", "echo never")
        assert r.returncode == 75, r.stderr
        assert 4 <= time.monotonic() - t0 < 60
        assert r.stdout == "" and "never" not in r.stderr
        assert "the cloud is busy: waiting in TT CI's queue" in r.stderr
        assert "queued: position 1, waiting for capacity" in r.stderr
        assert "no VM within --max-wait 4 s" in r.stderr and "did not run" in r.stderr
        assert "no VM within --max-wait (nothing ran)" in r.stderr  # the summary's result
        assert [e["name"] for e in client.get("/v1/envs")] == ["blocker"]
        assert client.get("/v1/queue") == []

        cmd: list[str | Path] = [BIN / "tt", "job", "run", *job]
        proc = subprocess.Popen(
            [*cmd, "--", "echo never"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
            env=_env(cfg),
        )  # fmt: skip
        try:
            [row] = _wait_queued(client)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            stop(proc, grace=0)
        assert proc.returncode == 130, err
        assert f"ENV {row['env']} deleted" in err and "could not delete" not in err
        assert client.get("/v1/queue") == []
        assert [e["name"] for e in client.get("/v1/envs")] == ["blocker"]

        proc = subprocess.Popen(
            [*cmd, "--", "echo ran"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_env(cfg),
        )  # fmt: skip
        try:
            _wait_queued(client)
            assert client.delete_env_wait("blocker")
            out, err = proc.communicate(timeout=300)
        finally:
            stop(proc, grace=0)
        assert proc.returncode == 0, err
        assert out == "ran\n" and "granted after" in err and "queued: position 1" in err
    finally:
        client.delete_env_wait("blocker")
    _nothing_left(stack, client)
