"""`tt job run`'s planning (targets, images, origin, names, exit codes, paths) and its input
errors, which are refused before any VM exists. The real runs are in test_jobrun.py."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.cloudutil import BIN
from ttci.cli.artifacts import tar_dir
from ttci.cli.job_plan import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_QUEUE_TIMEOUT,
    EXIT_TIMEOUT,
    QUEUE_LINE_EVERY_S,
    Outcome,
    env_name,
    exit_code,
    image_for,
    job_exit,
    local_parent,
    origin_from_env,
    parse_targets,
    queue_news,
)
from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.naming import Target, parse_target
from ttci.wire.commands import ExecEvent
from ttci.wire.envs import ENV_NAME_RE, parse_origin

IMAGES = [
    "qemu:debian-12:amd64",
    "qemu:debian-12:arm64",
    "qemu:debian-12+systemd:amd64",
    "qemu:debian-13:amd64",
]


def test_targets_are_every_os_arch_pair_with_arch_aliases() -> None:
    assert parse_targets("debian-12, Debian-13", "x86_64,ARM64") == [
        Target("debian-12", Arch.AMD64),
        Target("debian-12", Arch.ARM64),
        Target("debian-13", Arch.AMD64),
        Target("debian-13", Arch.ARM64),
    ]
    assert parse_targets("debian-12,debian-12", "amd64") == [Target("debian-12", Arch.AMD64)]
    assert parse_targets("debian-12+systemd", "amd64") == [
        Target("debian-12", Arch.AMD64, "systemd")
    ]
    with pytest.raises(BadInput, match="unknown architecture 'sparc'"):
        parse_targets("debian-12", "sparc")
    with pytest.raises(BadInput, match="at least one"):
        parse_targets(",", "amd64")
    with pytest.raises(BadInput, match="--os 'debian' is not an OS release"):
        parse_targets("debian", "amd64")


def test_a_target_maps_to_exactly_one_image() -> None:
    assert image_for(Target("debian-12", Arch.AMD64), IMAGES) == "qemu:debian-12:amd64"
    assert image_for(Target("debian-12", Arch.AMD64, "systemd"), IMAGES) == (
        "qemu:debian-12+systemd:amd64"
    )
    with pytest.raises(BadInput) as e:
        image_for(Target("debian-13", Arch.ARM64), IMAGES)
    assert "no image serves --os debian-13 --arch arm64" in e.value.message
    assert e.value.hint is not None and "debian-12/arm64" in e.value.hint


def test_origin_says_jenkins_with_a_link_or_cli() -> None:
    jenkins = {
        "JENKINS_URL": "https://ci.example.org/",
        "BUILD_URL": "https://ci.example.org/job/app/17/",
        "JOB_NAME": "app",
        "BUILD_NUMBER": "17",
        "NODE_NAME": "built-in",
    }
    o = origin_from_env(jenkins, Target("debian-12", Arch.ARM64))
    assert o == {
        "kind": "jenkins",
        "job": "app #17 debian-12/arm64",
        "project": "app",
        "runner": "built-in",
        "url": "https://ci.example.org/job/app/17/",
    }
    assert parse_origin(o) == o  # the scheduler accepts it as is
    o = origin_from_env(
        {"BUILD_URL": "javascript:alert(1)", "JOB_NAME": "x"}, Target("debian-12", Arch.AMD64)
    )
    assert o["kind"] == "jenkins" and "url" not in o
    o = origin_from_env({}, Target("debian-12", Arch.AMD64))
    assert o["kind"] == "cli" and parse_origin(o) == o


def test_env_names_are_valid_and_distinct() -> None:
    names = {
        env_name(parse_target(f"{os_}:{arch}"), "a1b2c3")
        for os_ in ("debian-12", "debian-12+systemd", "debian-14")
        for arch in ("amd64", "ppc64el", "riscv64")
    }
    assert len(names) == 9 and all(ENV_NAME_RE.match(n) for n in names)


def test_exit_codes() -> None:
    assert exit_code(ExecEvent.from_dict({"event": "exit", "code": 0})) == 0
    assert exit_code(ExecEvent.from_dict({"event": "exit", "code": 7})) == 7
    assert (
        exit_code(ExecEvent.from_dict({"event": "exit", "code": None, "timed_out": True}))
        == EXIT_TIMEOUT
    )
    assert exit_code(ExecEvent.from_dict({"event": "exit", "code": None, "signal": 9})) == 137
    assert exit_code(ExecEvent.from_dict({"event": "error", "message": "VM lost"})) == EXIT_ERROR
    assert exit_code(None) == EXIT_ERROR


def test_the_jobs_exit_code_is_the_first_failing_targets() -> None:
    a, b = Target("debian-12", Arch.AMD64), Target("debian-12", Arch.ARM64)
    assert job_exit([Outcome(a, "e1", code=0), Outcome(b, "e2", code=0)]) == 0
    assert job_exit([Outcome(a, "e1", code=0), Outcome(b, "e2", code=5)]) == 5
    waited = Outcome(a, "e1", error="no VM within --max-wait", queue_timeout=True)
    assert job_exit([waited, Outcome(b, "e2", code=5)]) == EXIT_QUEUE_TIMEOUT
    assert job_exit([Outcome(b, "e2", code=5), waited]) == 5
    assert job_exit([Outcome(a, "e1", error="VM lost")]) == EXIT_ERROR
    assert waited.summary == "no VM within --max-wait (nothing ran)"
    # distinct from every code tt itself gives (the command's own codes are its business)
    assert len({EXIT_QUEUE_TIMEOUT, EXIT_TIMEOUT, EXIT_ERROR, EXIT_INTERRUPTED, 2}) == 5


def test_a_waiting_target_gets_a_line_when_its_place_changes_or_now_and_then() -> None:
    assert queue_news(None, 5, 100.0)  # the first queued event
    assert not queue_news((5, 100.0), 5, 101.0)
    assert queue_news((5, 100.0), 4, 101.0)
    assert queue_news((5, 100.0), 5, 100.0 + QUEUE_LINE_EVERY_S)


def test_artifact_paths_stay_inside(tmp_path: Path) -> None:
    assert local_parent("out/report.xml", tmp_path) == tmp_path / "out"
    assert local_parent("/var/log/syslog", tmp_path) == tmp_path
    with pytest.raises(BadInput, match="leaves the work directory"):
        local_parent("../../etc/passwd", tmp_path)


def test_working_dir_tar_honours_excludes(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.c").write_text("int main;")
    (tmp_path / "build.o").write_text("x")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_text("x")
    with tarfile.open(fileobj=io.BytesIO(tar_dir(tmp_path, ["*.o", ".venv"]))) as tar:
        names = sorted(n.removeprefix("./") for n in tar.getnames())
    assert names == [".", "src", "src/main.c"]


def _tt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TT_CONFIG": str(cwd / "no-config.json")}
    return subprocess.run(
        [BIN / "tt", "job", "run", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--os", "debian-12", "--arch", "amd64"], "give either -- COMMAND or --script FILE"),
        (
            ["--os", "debian-12", "--arch", "amd64", "--script", "x.sh", "--", "true"],
            "give either -- COMMAND or --script FILE",
        ),
        (["--os", "debian-12", "--arch", "amd64", "--script", "nope.sh"], "nope.sh does not exist"),
        (["--os", "debian-12", "--arch", "mips", "--", "true"], "unknown architecture 'mips'"),
        (["--os", "debian-12", "--arch", "amd64", "--timeout", "1s", "--", "true"], "outside 10 s"),
        (
            ["--os", "debian-12", "--arch", "amd64", "--max-wait", "soon", "--", "true"],
            "--max-wait 'soon' is not a duration",
        ),
        (
            ["--os", "debian-12", "--arch", "amd64", "--max-wait", "40d", "--", "true"],
            "is outside 0 .. 30 days",
        ),
        (
            ["--os", "debian-12", "--arch", "amd64", "--artifact", "../x", "--", "true"],
            "leaves the work directory",
        ),
        (["--os", "debian-12", "--arch", "amd64", "--", "true"], "no scheduler configured"),
    ],
)
def test_bad_input_is_refused_before_any_vm(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "x.sh").write_text("true\n")
    r = _tt(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "hint:" in r.stderr
