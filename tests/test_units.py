"""`tt host install` and the systemd units it writes. These machines run no systemd, so the units
are checked with `systemd-analyze verify` (and `security --offline` for the hardening), and each
unit's ExecStart line is run as written: every daemon starts from its config file alone (no flag,
no TT_* variable), answers GET /readyz with 200, and stops on SIGTERM.

The install runs for real (the `tt` CLI) into a temporary config and unit directory; the test
then edits the config files as an operator would (ports, state directories, a private libvirtd)
so the daemons stay off the machine's own ports and state.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.cloudutil import free_port

BIN = Path(sys.executable).parent
UNITS = ("tt-scheduler", "tt-hostd", "tt-github-webhooks")


def _env(home: Path) -> dict[str, str]:
    """No TT_* variable: the config file alone."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TT_", "XDG_"))}
    return {**keep, "HOME": str(home)}


def _tt(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tt"), *argv], capture_output=True, text=True, env=_env(home), timeout=60
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    r = _tt(
        root,
        "host",
        "install",
        "--scheduler",
        "--github",
        "--etc",
        str(root / "etc"),
        "--unit-dir",
        str(root / "units"),
        "--no-enable",
    )
    assert r.returncode == 0, r.stderr
    assert "--no-enable: start them with systemctl" in r.stdout
    assert "other hosts join with: tt host install --join" in r.stdout
    return root


def _exec_start(unit: Path) -> list[str]:
    (line,) = [x for x in unit.read_text().splitlines() if x.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def _props(unit: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line[:40])


def test_install_writes_units_configs_and_secret_files(installed: Path) -> None:
    etc = installed / "etc"
    for secret in ("admin-token", "join-token", "hostd-token"):
        assert (etc / secret).stat().st_mode & 0o777 == 0o600
        assert len((etc / secret).read_text().strip()) >= 32
    sched = tomllib.loads((etc / "tt-scheduler.toml").read_text())
    assert sched == {
        "listen": "127.0.0.1:7400",
        "admin-token-file": str(etc / "admin-token"),
        "join-token-file": str(etc / "join-token"),
    }
    hostd = tomllib.loads((etc / "tt-hostd.toml").read_text())
    assert hostd["join"] == "127.0.0.1:7400" and hostd["token-file"] == str(etc / "hostd-token")
    for program in UNITS:
        argv = _exec_start(installed / "units" / f"{program}.service")
        assert argv[0] == str(BIN / program) and argv[-2:] == [
            "--config-file",
            str(etc / f"{program}.toml"),
        ]
        assert "token" not in " ".join(argv)  # no secret on a command line
    # Run again: the config files (maybe edited since) are kept, the secrets too.
    before = (etc / "admin-token").read_text()
    r = _tt(
        installed,
        "host",
        "install",
        "--scheduler",
        "--etc",
        str(etc),
        "--unit-dir",
        str(installed / "units"),
        "--no-enable",
    )
    assert r.returncode == 0 and f"kept {etc / 'tt-scheduler.toml'}" in r.stdout
    assert (etc / "admin-token").read_text() == before


def test_the_units_verify(installed: Path) -> None:
    units = [str(installed / "units" / f"{p}.service") for p in UNITS]
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    for program in UNITS:
        props = _props(installed / "units" / f"{program}.service")
        assert props["Restart"] == "on-failure" and props["StateDirectory"] == "ttci"
        assert props["EnvironmentFile"].startswith("-")  # optional TT_* secrets
    hostd = _props(installed / "units/tt-hostd.service")
    assert "PrivateDevices" not in hostd and "RestrictAddressFamilies" not in hostd  # /dev/kvm
    assert hostd["Delegate"] == "yes"  # cgroups for a private libvirtd
    for strict in ("tt-scheduler", "tt-github-webhooks"):
        props = _props(installed / "units" / f"{strict}.service")
        assert props["ProtectSystem"] == "strict" and props["NoNewPrivileges"] == "yes"
        r = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", units[UNITS.index(strict)]],
            capture_output=True,
            text=True,
        )
        score = float(r.stdout.rsplit(":", 1)[1].split()[0])
        assert score < 3, r.stdout[-500:]  # "OK" in systemd's words


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "give --scheduler"),
        (["--scheduler", "--join", "10.0.0.1:7400"], "give --scheduler"),
        (["--join", "10.0.0.1:7400"], "--join needs --join-token-file"),
    ],
)
def test_install_says_what_is_missing(tmp_path: Path, argv: list[str], says: str) -> None:
    r = _tt(tmp_path, "host", "install", "--etc", str(tmp_path / "etc"), "--no-enable", *argv)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "etc").exists()


def test_a_host_joins_with_one_command(tmp_path: Path) -> None:
    token = tmp_path / "join-token"
    token.write_text("the-pools-join-token-" + "j" * 20 + "\n")
    etc = tmp_path / "etc"
    r = _tt(
        tmp_path,
        "host",
        "install",
        "--join",
        "10.0.0.1:7400",
        "--join-token-file",
        str(token),
        "--advertise",
        "10.0.0.2:7420",
        "--etc",
        str(etc),
        "--unit-dir",
        str(tmp_path / "units"),
        "--no-enable",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["tt-hostd.service"]
    hostd = tomllib.loads((etc / "tt-hostd.toml").read_text())
    assert hostd == {
        "listen": "0.0.0.0:7420",
        "token-file": str(etc / "hostd-token"),
        "join": "10.0.0.1:7400",
        "join-token-file": str(etc / "join-token"),  # a copy hostd may read (0600)
        "advertise": "10.0.0.2:7420",
    }
    assert (etc / "join-token").read_text() == token.read_text()
    assert (etc / "join-token").stat().st_mode & 0o777 == 0o600


def _edit(path: Path, **values: object) -> None:
    """Set keys in a config file, as an operator would."""
    data = tomllib.loads(path.read_text())
    data.update({k.replace("_", "-"): v for k, v in values.items()})
    lines = []
    for key, value in data.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def _start(argv: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(home))


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> dict:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            r = requests.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return dict(r.json())
            last = r.text
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.3)
    raise AssertionError(f"{url}/readyz never 200: {last}\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def configured(installed: Path, tmp_path: Path) -> Iterator[dict[str, object]]:
    """The installed config files, moved off the machine's ports and state."""
    etc = installed / "etc"
    ports = {p: free_port() for p in UNITS}
    state = tmp_path / "state"
    _edit(
        etc / "tt-scheduler.toml", listen=f"127.0.0.1:{ports['tt-scheduler']}", state_dir=str(state)
    )
    _edit(
        etc / "tt-hostd.toml",
        listen=f"127.0.0.1:{ports['tt-hostd']}",
        join=f"127.0.0.1:{ports['tt-scheduler']}",
        state_dir=str(tmp_path / "hostd"),
        image_path=str(tmp_path / "images"),
        private_libvirtd=True,
        fetch_images="none",
        cpu_total=2,
        mem_total=1024,
        disk_total=10,
    )
    _edit(
        etc / "tt-github-webhooks.toml",
        listen=f"127.0.0.1:{ports['tt-github-webhooks']}",
        state_dir=str(tmp_path / "github"),
        api_url="http://127.0.0.1:9",
    )
    (etc / "github-webhook-secret").write_text("whsec-" + "w" * 20 + "\n")
    (etc / "github-token").write_text("ghp_" + "g" * 36 + "\n")
    admin = (etc / "admin-token").read_text().strip()
    (etc / "github-scheduler.json").write_text(
        json.dumps({"server": f"http://127.0.0.1:{ports['tt-scheduler']}", "token": admin})
    )
    yield {"ports": ports, "admin": admin}


@pytest.mark.e2e
def test_every_daemon_starts_from_its_config_file_alone(
    installed: Path, configured: dict[str, object], tmp_path: Path
) -> None:
    ports: dict[str, int] = configured["ports"]  # type: ignore[assignment]
    running: list[subprocess.Popen[bytes]] = []
    try:
        for program in UNITS:  # the scheduler first: hostd joins it, the GitHub service calls it
            argv = _exec_start(installed / "units" / f"{program}.service")
            log = tmp_path / f"{program}.log"
            proc = _start(argv, installed, log)
            running.append(proc)
            body = _ready(f"http://127.0.0.1:{ports[program]}", proc, log)
            assert body["ready"] and body["failed"] == [], body
            if program == "tt-hostd":
                assert body["checks"]["scheduler"]["detail"].startswith("joined as ")
                assert body["checks"]["libvirt"]["detail"].startswith("libvirt ")
            r = subprocess.run(
                [*argv, "--print-config"],
                capture_output=True,
                text=True,
                env=_env(installed),
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert str(configured["admin"]) not in r.stdout
            assert f'listen = "127.0.0.1:{ports[program]}"  # file ' in r.stdout
        status = requests.get(
            f"http://127.0.0.1:{ports['tt-scheduler']}/v1/status",
            headers={"Authorization": f"Bearer {configured['admin']}"},
            timeout=10,
        ).json()
        assert status["hosts_up"] == 1, status
    finally:
        codes = [_stop(p) for p in reversed(running)]
    assert codes == [0, 0, 0], codes
