"""The driver's pure decisions: targets, sizes, names, origin, config JSON, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_executor.core import job
from ttci.model.arch import Arch
from ttci.wire.commands import ExecEvent, ExitStatus
from ttci.wire.envs import EnvRequest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [
    "qemu:debian-12:amd64",
    "qemu:debian-12:arm64",
    "qemu:debian-12+systemd:amd64",
    "qemu:debian-13:amd64",
]


@pytest.mark.parametrize(
    ("jv", "image"),
    [
        ({"TT_OS": "debian-12", "TT_ARCH": "arm64"}, "qemu:debian-12:arm64"),
        ({"TT_OS": "Debian-12", "TT_ARCH": "aarch64"}, "qemu:debian-12:arm64"),
        ({"TT_OS": "debian-12"}, "qemu:debian-12:amd64"),
        ({"TT_OS": "debian-12", "TT_ARCH": "x86_64", "TT_PROFILE": "systemd"}, IMAGES[2]),
        ({"CI_JOB_IMAGE": "debian-12:arm64"}, "qemu:debian-12:arm64"),
        ({"CI_JOB_IMAGE": "qemu:debian-13:amd64"}, "qemu:debian-13:amd64"),
        ({"CI_JOB_IMAGE": "debian-12+systemd:amd64"}, IMAGES[2]),
        ({"CI_JOB_IMAGE": "debian-12"}, "qemu:debian-12:amd64"),
        # the matrix variables win over a default image set for the whole pipeline
        ({"CI_JOB_IMAGE": "debian-13:amd64", "TT_OS": "debian-12", "TT_ARCH": "arm64"}, IMAGES[1]),
    ],
)
def test_target_from_variables_or_image(jv: dict[str, str], image: str) -> None:
    assert job.pick_image(job.target(jv), IMAGES) == image


def test_unknown_target_lists_what_exists() -> None:
    t = job.target({"TT_OS": "debian-12", "TT_ARCH": "riscv64"})
    with pytest.raises(job.JobError) as e:
        job.pick_image(t, IMAGES)
    assert "no host offers debian-12:riscv64 (asked by TT_OS/TT_ARCH)" in e.value.message
    assert e.value.hint == (
        "targets that exist: debian-12:amd64, debian-12:arm64, debian-12+systemd:amd64, "
        "debian-13:amd64"
    )
    with pytest.raises(job.JobError, match="none"):
        job.pick_image(t, [])


@pytest.mark.parametrize(
    ("jv", "message"),
    [
        ({}, "the job names no target"),
        ({"TT_ARCH": "arm64"}, "TT_OS is not set"),
        ({"TT_OS": "debian 12"}, "is not an OS release"),
        ({"TT_OS": "debian-12", "TT_ARCH": "vax"}, "unknown architecture 'vax'"),
        ({"CI_JOB_IMAGE": "debian-12:arm64:extra"}, "does not name an OS and architecture"),
        ({"CI_JOB_IMAGE": "ubuntu:22.04"}, "is not an OS release"),
    ],
)
def test_bad_targets_say_what_to_write(jv: dict[str, str], message: str) -> None:
    with pytest.raises(job.JobError) as e:
        job.target(jv)
    assert message in e.value.message and e.value.hint


def test_sizes_default_and_limits() -> None:
    lim = job.Limits(cpus=1, memory_mib=512, max_cpus=2, max_memory_mib=4096, max_disk_gib=20)
    assert job.size({}, lim) == job.Size(1, 512, 0)
    assert job.size({"TT_CPUS": "2", "TT_MEMORY": "2G", "TT_DISK": "10"}, lim) == job.Size(
        2, 2048, 10
    )
    assert job.size({"TT_MEMORY": "768M"}, lim).memory_mib == 768
    with pytest.raises(job.JobError) as e:
        job.size({"TT_CPUS": "8", "TT_MEMORY": "64G", "TT_DISK": "100"}, lim)
    assert e.value.message == (
        "TT_CPUS 8 is outside 0.1..2; TT_MEMORY 65536 MiB is outside 128..4096 MiB; "
        "TT_DISK 100 GiB is outside 1..20 GiB (0: image size)"
    )
    for bad in ({"TT_MEMORY": "lots"}, {"TT_CPUS": "x"}, {"TT_DISK": "big"}):
        with pytest.raises(job.JobError):
            job.size(bad, lim)


def test_env_name_origin_and_request() -> None:
    jv = {
        "CI_JOB_ID": "4711",
        "CI_JOB_URL": "https://gitlab.example.test/g/p/-/jobs/4711",
        "CI_PROJECT_PATH": "g/p",
        "CI_RUNNER_DESCRIPTION": "vm runner",
        "CI_JOB_TIMEOUT": "600",
    }
    assert job.env_name(jv) == "gl-4711"
    req = job.env_request(jv, "qemu:debian-12:arm64", job.Size(2, 1024, 0))
    assert req == EnvRequest(
        name="gl-4711",
        os_prefix="qemu:debian-12:arm64",
        cpus=2,
        memory_mib=1024,
        disk_gib=0,
        dup_each=1,
        life_s=600 + 900,
        origin={
            "kind": "gitlab",
            "job": "4711",
            "url": "https://gitlab.example.test/g/p/-/jobs/4711",
            "project": "g/p",
            "runner": "vm runner",
        },
    )
    assert EnvRequest.from_dict(req.to_dict()) == req  # what the scheduler accepts
    for bad in ({}, {"CI_JOB_ID": "12; rm"}):
        with pytest.raises(job.JobError):
            job.env_name(bad)
    assert "url" not in job.origin({"CI_JOB_ID": "1", "CI_JOB_URL": "javascript:x"})


def test_config_output_is_what_the_runner_parses() -> None:
    out = job.config_output("1.2.3", {"CI_JOB_ID": "9"})
    assert out["builds_dir"] and out["cache_dir"] and out["builds_dir_is_shared"] is False
    assert out["driver"] == {"name": "tt-ci", "version": "1.2.3"}
    assert out["hostname"] == "gl-9"
    assert all(isinstance(v, str) for v in out["job_env"].values())
    assert job.config_output("1", {})["hostname"] == "tt-ci"  # no job id yet: still valid


@pytest.mark.parametrize(
    ("event", "rc", "code"),
    [
        ({"event": "exit", "code": 0}, 0, None),
        ({"event": "exit", "code": 3}, 1, 3),
        ({"event": "exit", "code": None, "signal": 9}, 1, 137),
        ({"event": "error", "message": "VM is lost", "lost": True}, 2, None),
        (None, 2, None),
        ({"event": "exit", "code": None}, 2, None),
    ],
)
def test_stage_end_maps_to_the_runners_codes(
    event: dict[str, object] | None, rc: int, code: int | None
) -> None:
    end = job.stage_end(None if event is None else ExecEvent.from_dict(event), job.ExitCodes())
    assert (end.driver_rc, end.build_exit_code) == (rc, code)
    assert rc == 0 or end.message


def test_exit_codes_come_from_the_environment() -> None:
    assert job.ExitCodes.from_env({}) == job.ExitCodes(1, 2)
    codes = job.ExitCodes.from_env(
        {"BUILD_FAILURE_EXIT_CODE": "7", "SYSTEM_FAILURE_EXIT_CODE": "8"}
    )
    assert job.stage_end(ExecEvent.exit(ExitStatus(5)), codes).driver_rc == 7
    assert job.stage_end(None, codes).driver_rc == 8


def test_stage_request_carries_the_script_byte_exact() -> None:
    import base64

    script = "#!/usr/bin/env bash\necho 'ünï ✓'\n".encode()
    req = job.stage_request(script, "step_release").to_dict()
    # small scripts: one exec in the guest, the script as bash -c's argument
    assert req["argv"][:2] == ["bash", "-c"] and req["argv"][-1] == "step_release"
    assert req["argv"][2] == job.PGID_LINE + script.decode() and "stdin_b64" not in req
    assert req["env"]["PATH"].startswith("/usr/local/sbin") and "TT_TOKEN" not in req["env"]
    # too big for one argument, not UTF-8 or holding NUL: on stdin through the wrapper
    for big in (b"#" * (job.ARGV_SCRIPT_MAX + 1), b"echo \xff\n", b"echo a\0b\n"):
        req = job.stage_request(big, "build_script").to_dict()
        assert req["argv"][:2] == ["/bin/sh", "-c"] and base64.b64decode(req["stdin_b64"]) == big
    assert job.target({"TT_OS": "debian-12", "TT_ARCH": "arm64"}).arch is Arch.ARM64
