"""Cache volumes for real (qcow2 backend): `tt up`'s stack, real VMs, `tt job run --cache`.

A succeeding job's writes are seen by the next job of the same key; a failing job's never; two
concurrent jobs each get their own clone and the later commit wins; another project's (or
another user's) key is a different cache; a host over its --cache-size evicts the least recently
used cache; nothing is left behind (clones, volumes) once the jobs are gone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudutil import BIN, small_cloud
from tests.conftest import built_image
from tests.gitlab.harness import Job, Runner
from ttci.cli.allinone import Stack
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.cache import CacheScope

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
LIMIT_MIB = 160  # the host's --cache-size here: two caches of 100 MB do not fit


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path, Client]]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("cache-cloud")
    os.environ["TT_HOSTD_CACHE_SIZE"] = f"{LIMIT_MIB}M"  # hostd takes TT_* from its caller
    try:
        with small_cloud(state) as stack:
            client = Client(config.ClientConfig(stack.scheduler, stack.token))
            yield stack, state / "client.json", client
            assert client.get("/v1/envs") == []
            assert _clones(stack) == []
    finally:
        os.environ.pop("TT_HOSTD_CACHE_SIZE", None)


def _hostd_db(stack: Stack) -> Path:
    return next(stack.state_dir.rglob("hostd.db"))


def _clones(stack: Stack) -> list[tuple[str, ...]]:
    with sqlite3.connect(_hostd_db(stack)) as db:
        return db.execute("select volume, vm from cache_clones").fetchall()


def _job(
    cfg: Path, tmp: Path, cache: str, script: str, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JENKINS_", "BUILD_"))}
    return subprocess.run(
        [BIN / "tt", "job", "run", "--os", "debian-12", "--arch", "amd64", "--no-copy",
         "--cache", cache, "--", script],
        cwd=tmp, capture_output=True, text=True, timeout=600,
        env={**base, "TT_CONFIG": str(cfg), **env},
    )  # fmt: skip


def test_success_commits_failure_discards(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    _, cfg, _ = cloud
    first = _job(cfg, tmp_path, "deps:/cache", "test ! -e /cache/a && echo one > /cache/a")
    assert first.returncode == 0, first.stderr
    failed = _job(cfg, tmp_path, "deps:/cache", "echo bad > /cache/b; echo two > /cache/a; exit 3")
    assert failed.returncode == 3, failed.stderr
    seen = _job(cfg, tmp_path, "deps:/cache", "cat /cache/a; ls /cache")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == ["one", "a", "lost+found"]  # the failed job's writes are gone


def test_concurrent_jobs_each_clone_and_the_later_commit_wins(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    _, cfg, _ = cloud
    out: dict[str, subprocess.CompletedProcess[str]] = {}

    def job(name: str, sleep: int) -> None:
        w = "/var/cache/race/w"
        script = f"test ! -e {w} && echo {name} > {w} && sleep {sleep}"
        out[name] = _job(cfg, tmp_path, "race:/var/cache/race", script)

    quick = threading.Thread(target=job, args=("quick", 1))
    slow = threading.Thread(target=job, args=("slow", 12))
    slow.start()
    quick.start()
    for t in (quick, slow):
        t.join()
    assert out["quick"].returncode == 0, out["quick"].stderr  # neither saw the other's file
    assert out["slow"].returncode == 0, out["slow"].stderr
    after = _job(cfg, tmp_path, "race:/var/cache/race", "cat /var/cache/race/w")
    assert after.stdout.strip() == "slow"


def test_another_project_or_user_never_sees_the_cache(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    stack, cfg, client = cloud
    ok = _job(cfg, tmp_path, "scoped:/cache", "echo mine > /cache/f")
    assert ok.returncode == 0, ok.stderr
    jenkins = {"JENKINS_URL": "http://ci.example/", "JOB_NAME": "other-project"}
    other = _job(cfg, tmp_path, "scoped:/cache", "ls -A /cache; echo ok > /cache/g", **jenkins)
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["lost+found"]  # a project of its own: an empty cache
    mine = {(c["project"], c["key"]) for c in client.caches()}
    assert {("user:admin", "scoped"), ("jenkins:other-project", "scoped")} <= mine
    # another user: sees none of them, deletes none of them
    eve_token = client._call("POST", "/v1/users", json={"name": "eve"}).json()["token"]
    eve = Client(config.ClientConfig(stack.scheduler, eve_token))
    assert eve.caches() == []
    gone = subprocess.run(
        [BIN / "tt", "cache", "del", "scoped"], capture_output=True, text=True,
        env={**os.environ, "TT_CONFIG": str(_config(tmp_path, stack.scheduler, eve_token))},
    )  # fmt: skip
    assert gone.returncode != 0 and "no cache 'scoped'" in gone.stderr
    assert ("user:admin", "scoped") in {(c["project"], c["key"]) for c in client.caches()}
    # the owner deletes theirs by KEY (and a CI project's with --project)
    client.delete_cache("scoped")
    client.delete_cache("scoped", project="jenkins:other-project")
    assert "scoped" not in {c["key"] for c in client.caches()}


def _config(tmp: Path, server: str, token: str) -> Path:
    path = tmp / "eve.json"
    path.write_text(json.dumps({"server": server, "token": token}))
    return path


def test_host_over_its_limit_evicts_the_least_recently_used(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    stack, cfg, client = cloud
    write = "dd if=/dev/zero of=/cache/blob bs=1M count=100 status=none && sync"
    assert _job(cfg, tmp_path, "big-a:/cache", write).returncode == 0
    assert "big-a" in {c["key"] for c in client.caches()}
    time.sleep(1.1)  # last use is kept to the second or better; keep the order plain
    assert _job(cfg, tmp_path, "big-b:/cache", write).returncode == 0
    keys = {c["key"]: c for c in client.caches()}
    assert "big-a" not in keys, keys  # evicted: the two did not fit 160 MiB
    assert keys["big-b"]["bytes"] >= 100 << 20
    info = client.get("/v1/hosts")[0]
    assert info["caches"]["evictions"] >= 1
    assert info["caches"]["bytes"] <= LIMIT_MIB << 20
    metrics = urllib.request.urlopen(f"http://{stack.scheduler}/metrics", timeout=10).read()
    for line in ('ttci_host_cache_evictions_total{host="local"}', "ttci_host_cache_bytes{"):
        assert line in metrics.decode()
    sid = CacheScope("admin", "user:admin", "big-a").scope_id
    assert not list((stack.state_dir).rglob(f"caches/{sid}/*"))


def test_env_add_with_a_cache_commits_only_when_asked(
    cloud: tuple[Stack, Path, Client], tmp_path: Path
) -> None:
    _, cfg, client = cloud
    env = {**os.environ, "TT_CONFIG": str(cfg)}

    def tt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BIN / "tt", *args], capture_output=True, text=True, env=env)

    bad = tt("env", "add", "c1", "--os-prefix", "debian-12:amd64", "--cache", "x:/etc/x")
    assert bad.returncode != 0 and "inside the guest's system folder /etc" in bad.stderr
    for n, commit in ((1, False), (2, True)):
        add = tt("env", "add", f"c{n}", "--os-prefix", "debian-12:amd64", "--cache", "man:/srv/c")
        assert add.returncode == 0, add.stderr
        run = tt("env", "run", f"c{n}", "--cmd", f"ls /srv/c; echo {n} > /srv/c/n")
        assert run.returncode == 0, run.stderr
        assert "n" not in run.stdout.split()  # the first discarded: the second saw nothing
        gone = tt("env", "del", f"c{n}", *(["--commit-cache"] if commit else []))
        assert gone.returncode == 0, gone.stderr
    listed = json.loads(tt("cache", "list", "--json").stdout)
    assert [c["commits"] for c in listed if c["key"] == "man"] == [1]
    client.delete_cache("man")


def test_gitlab_tt_cache_commits_successful_jobs_per_project(
    cloud: tuple[Stack, Path, Client],
) -> None:
    _, cfg, client = cloud
    runner = Runner(
        [str(BIN / "tt-gitlab-executor"), "--memory", "384"],
        env={"TT_CONFIG": str(cfg)},
        prepare_retry_delay=0,
    )
    jv = {"TT_OS": "debian-12", "TT_ARCH": "amd64", "TT_CACHE": "gl:/cache"}

    def job(n: int, script: str, project: str = "group/app") -> str:
        r = runner.run_job(Job(n, [script], variables=jv, project_path=project))
        return r.status + "\n" + r.text()

    assert job(301, "test ! -e /cache/x && echo 1 > /cache/x").startswith("success")
    assert job(302, "echo bad > /cache/y; cat /cache/x; exit 4").startswith("failed")
    seen = job(303, 'echo "files:$(ls -m /cache)."')
    assert seen.startswith("success") and "files:lost+found, x." in seen  # no y: 302 failed
    other = job(304, "test ! -e /cache/x", project="group/other")  # another project's own
    assert other.startswith("success"), other
    mine = {c["project"]: c["commits"] for c in client.caches() if c["key"] == "gl"}
    assert mine == {"gitlab:group/app": 2, "gitlab:group/other": 1}
