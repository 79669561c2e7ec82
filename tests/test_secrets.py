"""Secrets at rest and in flight: state directories 0700 and databases 0600 (made so, old ones
fixed), every daemon secret from the environment or a file, the README never putting a token on
a command line, and a real scheduler and hostd (no VMs) driven with known tokens through
registrations, heartbeats, impostors, ENV requests and admin logins, whose logs, /metrics and
the process list never show one of them."""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.cloudutil import free_port
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.db import Store
from ttci.infra.proc import BASE_ENV, stop
from ttci.infra.settings import DAEMONS, SETTINGS, resolve
from ttci.scheduler.web.serve import make_parser as scheduler_parser

ROOT = Path(__file__).resolve().parent.parent


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- file modes ---------------------------------------------------------------------------------
def test_a_new_store_is_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "state" / "deep" / "x.db", [])
    store.db.execute("create table t (a)")
    store.db.conn.commit()
    assert _mode(tmp_path / "state" / "deep") == 0o700
    for name in ("x.db", "x.db-wal", "x.db-shm"):
        path = tmp_path / "state" / "deep" / name
        assert path.exists() and _mode(path) == 0o600, name


def test_an_old_open_store_is_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "old"
    store = Store(d / "x.db", [])
    store.db.execute("create table t (a)")
    store.db.conn.commit()
    d.chmod(0o755)
    for name in ("x.db", "x.db-wal", "x.db-shm"):
        (d / name).chmod(0o644)
    with caplog.at_level(logging.WARNING, "ttci.infra.db"):
        Store(d / "x.db", [])
    assert _mode(d) == 0o700
    assert all(_mode(d / n) == 0o600 for n in ("x.db", "x.db-wal", "x.db-shm"))
    assert "was mode 0755; now 0700" in caplog.text and "was mode 0644; now 0600" in caplog.text


def test_a_shared_sticky_directory_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with caplog.at_level(logging.WARNING, "ttci.infra.db"):
        Store(shared / "x.db", [])
    assert _mode(shared) == 0o1777  # never chmod a /tmp
    assert "shared" in caplog.text and _mode(shared / "x.db") == 0o600


# -- where secrets come from --------------------------------------------------------------------
@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_every_daemon_secret_can_come_from_a_file(daemon: str) -> None:
    used = {e if isinstance(e, str) else e[0] for e in DAEMONS[daemon]}
    for name in used:
        s = SETTINGS[name]
        if s.secret:
            assert s.file and s.file in used, f"{daemon}: {name} has no file form"


def test_a_token_file_beats_the_variable_and_a_flag_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "admin.token"
    f.write_text("from-the-file\n")
    env = {"TT_ADMIN_TOKEN": "from-env", "TT_ADMIN_TOKEN_FILE": str(f)}
    a = scheduler_parser().parse_args([])
    resolve(a, environ=env, etc=tmp_path)
    assert a.admin_token == "from-the-file"
    a = scheduler_parser().parse_args(["--hostd-token-file", str(f), "--join-token", "on-argv"])
    with caplog.at_level(logging.WARNING, "ttci.settings"):
        resolve(a, environ={}, etc=tmp_path)
    assert a.hostd_token == "from-the-file" and a.join_token == "on-argv"
    assert "--join-token is on the command line" in caplog.text
    assert "TT_JOIN_TOKEN_FILE" in caplog.text and "on-argv" not in caplog.text


SECRET_FLAG = re.compile(r"--(?:[a-z]+-)?(?:token|secret)(?![-\w])[ =]+(\S+)")


def test_no_readme_puts_a_token_on_a_command_line() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "ci-templates").glob("*/README.md"))]
    docs += sorted((ROOT / "docs").rglob("*.md"))  # the guides the README links
    found = []
    for doc in docs:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in SECRET_FLAG.finditer(line):
                if m[1].rstrip("`),.;") not in ("-", "FILE"):  # `--token -` reads stdin
                    found.append(f"{doc.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


# -- a real scheduler and hostd -------------------------------------------------------------------
ADMIN = "adm-" + secrets.token_urlsafe(24)
JOIN = "join-" + secrets.token_urlsafe(24)
HOSTD = "hostd-" + secrets.token_urlsafe(24)
IMPOSTOR = "impostor-" + secrets.token_urlsafe(24)
GUESS = "guess-" + secrets.token_urlsafe(24)


@dataclass
class Cloud:
    state: Path
    sched: str
    hostd: str
    procs: list[subprocess.Popen[bytes]]


def _private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    state = tmp_path_factory.mktemp("secrets")
    (state / "images").mkdir()  # no images: nothing boots
    join_file = _private_file(state / "etc" / "join.token", JOIN)
    hostd_file = _private_file(state / "etc" / "hostd.token", HOSTD)
    sched, hostd = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = [
        _spawn(
            [
                *python_main("ttci.scheduler.web.serve"),
                *("-v", "--listen", sched, "--state-dir", str(state / "s")),
                *("--host-timeout", "6"),
            ],
            {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN_FILE": str(join_file)},
            state / "scheduler.log",
            "tt-scheduler",
        )
    ]
    try:
        procs.append(
            _spawn(
                [
                    *python_main("hostd.cli.main"),
                    *("-v", "serve", "--listen", hostd, "--state-dir", str(state / "h")),
                    *("--image-path", str(state / "images"), "--host-id", "h1"),
                    *("--private-libvirtd", "--cpu-total", "2", "--mem-total", "2048"),
                    *("--join", sched),
                ],
                {**BASE_ENV, "TT_HOSTD_TOKEN_FILE": str(hostd_file), "TT_JOIN_TOKEN": JOIN},
                state / "hostd.log",
                "tt-hostd",
            )
        )
        yield Cloud(state, f"http://{sched}", f"http://{hostd}", procs)
    finally:
        for p in reversed(procs):
            stop(p, grace=STOP_GRACE_S)


def _call(base: str, token: str, method: str, path: str, **kw: object) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, base + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def _wait_up(cloud: Cloud) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hosts = _call(cloud.sched, ADMIN, "GET", "/v1/hosts").json()
        if any(h["id"] == "h1" and h["state"] == "up" for h in hosts):
            return
        time.sleep(0.3)
    raise AssertionError("h1 never came up")


def _drive(cloud: Cloud) -> str:
    """Everything that carries a token, the right and the wrong ones; alice's token."""
    _wait_up(cloud)
    s = cloud.sched
    alice = _call(s, ADMIN, "POST", "/v1/users", json={"name": "alice"}).json()["token"]
    for path in ("/v1/status", "/v1/hosts", "/v1/images", "/v1/envs", "/v1/queue"):
        assert _call(s, alice, "GET", path).status_code == 200, path
    body = {"name": "leak-1", "os_prefix": "debian-12:amd64", "wait": False}
    assert _call(s, alice, "POST", "/v1/envs", json=body).status_code == 400  # no image
    assert _call(s, alice, "POST", "/v1/envs?dry_run=1", json=body).status_code == 400
    assert _call(s, alice, "POST", "/v1/envs", json={**body, "name": "gl-7"}).status_code == 403
    assert _call(s, GUESS, "GET", "/v1/envs").status_code == 401
    reg = {"api": 1, "id": "h1", "url": "http://127.0.0.1:9", "token": IMPOSTOR, "info": {}}
    assert _call(s, JOIN, "POST", "/v1/hosts/register", json=reg).status_code == 409
    beat = {"api": 1, "id": "h1", "info": {"images": []}}
    for bearer in (IMPOSTOR, JOIN):
        assert _call(s, bearer, "POST", "/v1/hosts/heartbeat", json=beat).status_code == 403
    assert _call(s, GUESS, "POST", "/v1/hosts/register", json=reg).status_code == 403
    browser = requests.Session()
    for token in (GUESS, alice, ADMIN):
        page = browser.get(s + "/admin/login", timeout=30).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf, page[:300]
        browser.post(s + "/admin/login", data={"token": token, "csrf_token": csrf[1]}, timeout=30)
    assert browser.get(s + "/admin/api/state", timeout=30).status_code == 200
    assert _call(cloud.hostd, HOSTD, "GET", "/v1/host").status_code == 200
    assert _call(cloud.hostd, GUESS, "GET", "/v1/host").status_code == 401
    time.sleep(5)  # a few heartbeats (every 2 s)
    _wait_up(cloud)
    return alice


def _cmdlines() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                raw = (d / "cmdline").read_bytes()
            except OSError:
                continue
            out.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return out


def test_no_token_in_logs_metrics_or_the_process_list(cloud: Cloud) -> None:
    alice = _drive(cloud)
    tokens = {
        "admin": ADMIN,
        "join": JOIN,
        "hostd": HOSTD,
        "alice": alice,
        "impostor": IMPOSTOR,
        "guess": GUESS,
    }
    places = {
        "scheduler /metrics": requests.get(cloud.sched + "/metrics", timeout=30).text,
        "hostd /metrics": requests.get(cloud.hostd + "/metrics", timeout=30).text,
        "process list": "\n".join(_cmdlines()),
    }
    logs = sorted(p for p in cloud.state.rglob("*.log") if p.is_file())
    assert cloud.state / "scheduler.log" in logs and cloud.state / "hostd.log" in logs
    places |= {str(p.relative_to(cloud.state)): p.read_text(errors="replace") for p in logs}
    assert "h1 registered" in places["scheduler.log"]  # the logs are there, and verbose
    assert "refused a heartbeat for host h1" in places["scheduler.log"]
    assert "admin login refused" in places["scheduler.log"]
    leaks = [
        f"{what} token in {where}"
        for where, text in places.items()
        for what, token in tokens.items()
        if token in text
    ]
    assert not leaks, leaks


def test_the_daemons_state_is_private(cloud: Cloud) -> None:
    _wait_up(cloud)
    for d in (cloud.state / "s", cloud.state / "s" / "scheduler", cloud.state / "h"):
        assert _mode(d) == 0o700, d
    for db in (cloud.state / "s" / "scheduler" / "scheduler.db", cloud.state / "h" / "hostd.db"):
        for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            assert _mode(f) == 0o600, f
