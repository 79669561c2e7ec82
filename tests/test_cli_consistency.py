"""One command line: VM sizes, durations and targets spelled the same way in `tt env`, `tt job
run`, the GitLab driver and the GitHub service (ttci/model/units.py, ttci/model/naming.py); the
old spellings still work with a note on stderr; every verb of `tt` takes --json and then prints
nothing but JSON on stdout; `tt env extend`.

The --json verbs are run against a real scheduler (its real app on loopback, fake hosts
registered through its own registration, rows in its real state: tests/admin_fake.py); verbs
that need VMs or an image build get stand-ins for exactly that part.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import waitress

from hostd.cli import image_cmd
from runner_executor.cli import make_parser as executor_parser
from runner_executor.core import job as gitlab_job
from tests.admin_fake import fake_scheduler
from tests.cloudutil import free_port
from tests.test_images_pure import _manifest
from ttci.cli import cache_cmd, env_cmd, env_files, job_output
from ttci.cli.job_plan import Outcome, parse_targets
from ttci.cli.main import main, make_parser
from ttci.cli.size_args import vm_size
from ttci.infra.settings import resolve
from ttci.model.errors import BadInput
from ttci.model.manifest import Manifest
from ttci.model.naming import Target
from ttci.model.units import (
    parse_cpus,
    parse_disk_gib,
    parse_duration_s,
    parse_memory_mib,
)
from ttci.scheduler.web.api import create_app
from ttci.wire.envs import parse_duration
from webhooks.cli import make_parser as webhooks_parser

ADMIN = "cli-admin-token-" + "c" * 20


# -- the parsers, walked ---------------------------------------------------------------------
def _leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[str, Any]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(" ".join(path), parser)]
    return [leaf for a in subs for n, p in a.choices.items() for leaf in _leaves(p, [*path, n])]


def _image_parser() -> argparse.ArgumentParser:
    """`tt image ...` as it runs (`tt` itself holds a stand-in that imports hostd late)."""
    p = argparse.ArgumentParser(prog="tt")
    image_cmd.register_pool(p.add_subparsers(dest="cmd", required=True))
    return p


def _tt_verbs() -> dict[str, argparse.ArgumentParser]:
    verbs = dict(_leaves(make_parser(), ["tt"]))
    assert "tt image" in verbs, "the tt image stand-in moved: walk the real one"
    del verbs["tt image"]
    return verbs | dict(_leaves(_image_parser(), ["tt"]))


def _options(p: argparse.ArgumentParser, shown_only: bool = False) -> set[str]:
    return {
        o
        for a in p._actions
        for o in a.option_strings
        if not (shown_only and a.help == argparse.SUPPRESS)
    }


TT_VERBS = _tt_verbs()
# Verbs whose output is a stream by nature, with the reason; their --json prints NDJSON events.
NDJSON_VERBS = {"tt env run": "the commands' output streams as it comes: one JSON event a line"}


@pytest.mark.parametrize("verb", sorted(TT_VERBS))
def test_every_verb_takes_json(verb: str) -> None:
    assert "--json" in _options(TT_VERBS[verb]), f"{verb} has no --json"
    if verb in NDJSON_VERBS:
        assert "NDJSON" in (TT_VERBS[verb]._option_string_actions["--json"].help or "")


def test_the_walk_sees_every_verb() -> None:
    for verb in ("tt env extend", "tt env push", "tt image build", "tt image prune", "tt up"):
        assert verb in TT_VERBS
    assert len(TT_VERBS) >= 30


# -- one spelling ----------------------------------------------------------------------------
def _sub(p: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        [a] = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        p = a.choices[name]
    return p


SIZED = {
    "tt env add": lambda: _sub(make_parser(), "env", "add"),
    "tt job run": lambda: _sub(make_parser(), "job", "run"),
    "tt-gitlab-executor": executor_parser,
    "tt-github-webhooks serve": lambda: _sub(webhooks_parser(), "serve"),
}


@pytest.mark.parametrize("program", sorted(SIZED))
def test_vm_size_is_spelled_cpus_memory_disk_everywhere(program: str) -> None:
    shown = _options(SIZED[program](), shown_only=True)
    assert {"--cpus", "--memory", "--disk"} <= shown
    assert not {"--cpu", "--mem"} & shown, "old spellings are hidden from --help"


def test_old_spellings_still_work_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    p = make_parser()
    a = p.parse_args(["env", "add", "e", "--os-prefix", "debian-12", "--cpu", "2", "--mem", "2G"])
    assert vm_size(a) == (2.0, 2048, 0)
    err = capsys.readouterr().err
    assert "--cpu is deprecated and will go away; write --cpus" in err
    assert "--mem is deprecated and will go away; write --memory" in err
    a = p.parse_args(["job", "run", "--os", "debian-12:amd64", "--mem", "768", "--", "true"])
    assert vm_size(a) == (1.0, 768, 0)
    assert "write --memory" in capsys.readouterr().err
    a = p.parse_args(["env", "add", "e", "--os-prefix", "d", "--cpus", "0.5", "--disk", "1T"])
    assert vm_size(a) == (0.5, 512, 1024) and capsys.readouterr().err == ""


def test_the_github_service_takes_the_old_memory_spellings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    serve = ["serve", "--memory", "2G", "--life-time", "2h", "--max-age", "30m"]
    a = webhooks_parser().parse_args(serve)
    resolve(a, {}, tmp_path)
    assert (a.memory, a.life_time, a.max_age) == (2048, 7200.0, 1800.0)
    a = webhooks_parser().parse_args(["serve", "--mem", "1536"])
    resolve(a, {}, tmp_path)
    assert a.memory == 1536 and "--mem is deprecated" in capsys.readouterr().err
    a = webhooks_parser().parse_args(["serve"])
    resolve(a, {"TT_GH_MEM": "3G"}, tmp_path)
    assert a.memory == 3072 and "TT_GH_MEM is deprecated" in caplog.text
    (tmp_path / "tt-github-webhooks.toml").write_text('mem = "768"\nreconcile-interval = "2m"\n')
    a = webhooks_parser().parse_args(["serve"])
    resolve(a, {}, tmp_path)
    assert (a.memory, a.reconcile_interval) == (768, 120.0)
    assert "mem is deprecated and will go away; write memory" in caplog.text
    a = webhooks_parser().parse_args(["serve"])
    resolve(a, {"TT_GH_MEMORY": "1G", "TT_GH_MEM": "2G"}, tmp_path)
    assert a.memory == 1024, "the new spelling wins"


def test_the_gitlab_driver_reads_sizes_the_same_way(tmp_path: Path) -> None:
    a = executor_parser().parse_args(["--memory", "2G", "--max-disk", "1T", "config"])
    resolve(a, {}, tmp_path)
    assert (a.memory, a.max_disk) == (2048, 1024)
    lim = gitlab_job.Limits(max_memory_mib=8192, max_disk_gib=100)
    size = gitlab_job.size({"TT_CPUS": "2", "TT_MEMORY": "1.5G", "TT_DISK": "20G"}, lim)
    assert size == gitlab_job.Size(2.0, 1536, 20)
    with pytest.raises(gitlab_job.JobError, match="TT_DISK '20X' is not a size"):
        gitlab_job.size({"TT_DISK": "20X"}, lim)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        *[("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400)],
        *[("1.5h", 5400), (" 2h ", 7200), (45, 45), (2.5, 2.5)],
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize(
    "bad", ["soon", "-1", "1h-", "h", "", "1e3", True, float("inf"), "9" * 400]
)
def test_bad_durations_say_what_to_write(bad: Any) -> None:
    with pytest.raises(BadInput, match="is not a duration") as e:
        parse_duration_s(bad, "--timeout")
    assert e.value.hint and "10m" in e.value.hint


@pytest.mark.parametrize(
    ("text", "mib"), [("512", 512), ("512M", 512), ("2G", 2048), ("2GiB", 2048), ("1.5g", 1536)]
)
def test_memory_sizes(text: str, mib: int) -> None:
    assert parse_memory_mib(text) == mib


def test_disk_sizes_cpus_and_bad_sizes() -> None:
    assert [parse_disk_gib(t) for t in ("20", "20G", "1T", "20480M", "0")] == [20, 20, 1024, 20, 0]
    assert parse_cpus("0.5") == 0.5 and parse_cpus(2) == 2.0
    for bad, call in (
        ("lots", parse_memory_mib),
        ("1.5", parse_memory_mib),
        ("2X", parse_disk_gib),
    ):
        with pytest.raises(BadInput):
            call(bad)
    with pytest.raises(BadInput, match="--cpus 'x' is not a number"):
        parse_cpus("x")


def test_lifetimes_and_waits_share_the_grammar() -> None:
    assert parse_duration("1h30m") == 5400
    with pytest.raises(BadInput, match="outside 10 s"):
        parse_duration("5s")


def test_job_run_targets_are_the_one_grammar() -> None:
    t = parse_targets("debian-12:arm64,debian-13", "amd64")
    assert [x.os_prefix for x in t] == ["debian-12:arm64", "debian-13:amd64"]
    assert [x.os_prefix for x in parse_targets("qemu:debian-12+systemd:amd64", None)] == [
        "debian-12+systemd:amd64"
    ]
    assert len(parse_targets("debian-12,debian-13", "amd64,arm64")) == 4
    with pytest.raises(BadInput, match="--arch is missing"):
        parse_targets("debian-12", None)


# -- --json: nothing but JSON on stdout ------------------------------------------------------
@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    """main() turns SIGTERM into KeyboardInterrupt, as `tt` does; not for the test process."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real scheduler app on loopback: 2 fake hosts, 6 ready ENVs of one VM, no VM booted."""
    s = fake_scheduler(tmp_path_factory.mktemp("cli-sched"), ADMIN, 6, hosts=2, jobs=5)
    port = free_port()
    server = waitress.create_server(create_app(s), host="127.0.0.1", port=port, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"127.0.0.1:{port}"
    server.close()
    s.stop()


@pytest.fixture
def client_env(scheduler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "tt.json"))
    monkeypatch.setenv("TT_SERVER", f"http://{scheduler}")
    monkeypatch.setenv("TT_TOKEN", ADMIN)


def _json_only(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> Any:
    assert main([*argv]) == code, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out)  # fails on anything else on stdout


SCHEDULER_VERBS = [
    ["status"],
    ["status", "--server"],
    ["queue"],
    ["env", "list"],
    ["env", "show", "ci-00001"],
    ["env", "add", "plan-1", "--os-prefix", "debian-12:amd64", "--dry-run"],
    ["env", "extend", "ci-00002", "--life-time", "3h"],
    ["user", "add", "jsonuser"],
    ["user", "list"],
    ["user", "quota", "jsonuser", "--vms", "2"],
    ["user", "quotas"],
    ["user", "quota", "jsonuser", "--clear"],
    ["user", "del", "jsonuser"],
    ["host", "drain", "fake-1"],
    ["host", "undrain", "fake-1"],
    ["config"],
    ["image", "list"],
]


@pytest.mark.usefixtures("client_env")
@pytest.mark.parametrize("argv", SCHEDULER_VERBS, ids=" ".join)
def test_json_verbs_print_only_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _json_only(capsys, *argv, "--json")


@pytest.mark.usefixtures("client_env")
def test_env_extend_moves_the_expiry(capsys: pytest.CaptureFixture[str]) -> None:
    before = _json_only(capsys, "env", "show", "ci-00003", "--json")["expires_at"]
    after = _json_only(capsys, "env", "extend", "ci-00003", "--life-time", "5h", "--json")
    assert after["expires_at"] > before
    assert main(["env", "extend", "ci-00003", "--life-time", "1h"]) == 0
    assert f"now expires at {after['expires_at']}" in capsys.readouterr().out  # never shortened
    assert main(["env", "extend", "ci-00003", "--life-time", "forever"]) == 2
    assert "lifetime 'forever' does not parse" in capsys.readouterr().err
    assert main(["env", "extend", "nope", "--life-time", "1h"]) == 1
    assert "nope" in capsys.readouterr().err


class _Files:
    """What push/get/del use of the client, where the VMs would be (none boot here)."""

    def __init__(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("out.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
        self.tar = buf.getvalue()

    def push(self, name: str, dest: str, data: bytes) -> list[dict[str, Any]]:
        return [{"vm": "a", "ok": True}, {"vm": "b", "ok": False, "error": "VM lost"}]

    def get_files(self, name: str, src: str, limit: int = 0) -> list[dict[str, Any]]:
        import base64

        return [{"vm": "a", "ok": True, "data": base64.b64encode(self.tar).decode()}]

    def delete_env(self, name: str, commit_cache: bool = False) -> dict[str, Any]:
        return {"name": name}


def test_files_and_del_print_only_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = _Files()
    monkeypatch.setattr(env_files, "_client", lambda: c)
    monkeypatch.setattr(env_cmd, "_client", lambda: c)
    monkeypatch.setattr(cache_cmd, "_client", lambda: c)  # tt env del lives there
    (tmp_path / "src").write_text("x")
    pushed = _json_only(
        capsys, "env", "push", "e", str(tmp_path / "src"), "/root", "--json", code=1
    )
    assert [r["ok"] for r in pushed] == [True, False]
    got = _json_only(capsys, "env", "get", "e", "/root/out.txt", str(tmp_path / "got"), "--json")
    assert got == [{"vm": "a", "ok": True, "path": str(tmp_path / "got" / "a")}]
    assert (tmp_path / "got" / "a" / "out.txt").read_text() == "ok"
    assert _json_only(capsys, "env", "del", "e", "--json")["deleted"] is True


def test_job_run_json_sends_the_commands_output_to_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = job_output.Output(prefix=False, all_to_stderr=True)
    out.write("debian-12/amd64", "stdout", b"hello\n")
    assert capfd.readouterr() == ("", "hello\n")
    out = job_output.Output(prefix=True)
    out.write("debian-12/amd64", "stdout", b"hello\n")
    assert capfd.readouterr().out == "[debian-12/amd64] hello\n"
    [t] = parse_targets("debian-12", "arm64")
    o = Outcome(t, "job-x-debian-12-arm64", image="qemu:debian-12:arm64", code=0)
    shown = json.loads(json.dumps(job_output.outcomes_json([o], 0)))
    assert shown["exit_code"] == 0 and shown["targets"][0]["target"] == "debian-12:arm64"
    assert shown["targets"][0]["result"] == "ok" and isinstance(t, Target)


@pytest.mark.usefixtures("client_env")
def test_job_run_json_refusal_prints_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["job", "run", "--os", "debian-12:s390x", "--no-copy", "--json", "--", "true"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no image serves --os debian-12 --arch s390x" in err


class _Builder:
    """An image build cannot run in the fast tests: this one reports a built image."""

    def __init__(self, image_path: Path, cache_dir: Path) -> None:
        pass

    def build_many(self, specs: list[Any], **kw: Any) -> list[tuple[Manifest, bool]]:
        kw["on_done"](_manifest(), True)
        return [(_manifest(), True)]


def test_image_build_and_prune_json_print_no_progress_on_stdout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(image_cmd, "Builder", _Builder)
    where = ["--image-path", str(tmp_path / "img"), "--cache-dir", str(tmp_path / "cache")]
    [m] = _json_only(capsys, "image", "build", "debian-12", "--arch", "arm64", *where, "--json")
    assert m["name"] == "qemu:debian-12:arm64"
    assert main(["image", "build", "debian-12", "--arch", "arm64", *where]) == 0
    assert "(1/1) qemu:debian-12:arm64: built" in capsys.readouterr().out  # without: progress
    (tmp_path / "img").mkdir()
    (tmp_path / "cache").mkdir()
    state = ["--state-dir", str(tmp_path / "state")]
    pruned = _json_only(capsys, "image", "prune", *where, *state, "--json")
    assert pruned == {"cache_trees": [], "partial_pulls": [], "templates": [], "image_volumes": []}
    assert _json_only(capsys, "image", "list", "--local", *where[:2], *state, "--json") == {
        "images": [],
        "broken": [],
    }


def test_host_install_json_prints_only_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--etc", str(tmp_path / "etc"), "--unit-dir", str(tmp_path / "units")]
    done = _json_only(capsys, "host", "install", "--scheduler", *where, "--no-enable", "--json")
    assert [Path(p).name for p in done["units"]] == ["tt-scheduler.service", "tt-hostd.service"]
    assert all(Path(p).is_file() for p in done["configs"] + done["units"])
    again = _json_only(capsys, "host", "install", "--scheduler", *where, "--no-enable", "--json")
    assert again["configs"] == [] and len(again["kept"]) == 2
