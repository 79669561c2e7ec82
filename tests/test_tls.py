"""TLS with a throw-away CA made here (the openssl CLI): the scheduler, hostd and the webhook
service serve HTTPS (ttci/infra/web_server.py); every client verifies them against the CA
(tt, Client, the GitLab driver's stdlib stream, hostd's joiner, scheduler -> hostd, the GitHub
service), and one without it is refused with a clear error. Real daemons on loopback, no VMs."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, Response

from hostd.service.joiner import Joiner, JoinRefused
from tests.cloudutil import free_port
from tests.conftest import IMAGE_PATH
from tests.github.payloads import headers, job_event
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.client.config import ClientConfig
from ttci.client.exec_stream import exec_events
from ttci.client.scheduler import Client
from ttci.infra.proc import BASE_ENV, stop
from ttci.infra.tls import TLSFiles, tls_files
from ttci.infra.web_server import WebServer, make_server
from ttci.model.errors import BadInput, TTError
from ttci.scheduler.hostd_client import HostdClient, HostUnreachable
from ttci.wire.commands import ExecEvent, ExecRequest, ExitStatus

ADMIN = "admin-" + secrets.token_urlsafe(12)
JOIN = "join-" + secrets.token_urlsafe(12)
HOSTD = "hostd-" + secrets.token_urlsafe(12)
SECRET = "hook-" + secrets.token_urlsafe(12)


@dataclass(frozen=True)
class PKI:
    ca: Path
    cert: Path
    key: Path

    @property
    def files(self) -> TLSFiles:
        return TLSFiles(self.cert, self.key)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> PKI:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost (EC P-256, 1 day)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=TT CI test CA", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf",
             cwd=d)  # fmt: skip
    for key in ("ca.key", "server.key"):
        (d / key).chmod(0o600)
    return PKI(d / "ca.pem", d / "server.pem", d / "server.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_ca_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TT_CA_FILE", "TT_SERVER", "TT_TOKEN", "TT_CONFIG"):
        monkeypatch.delenv(var, raising=False)


# -- the server's certificate and key ---------------------------------------------------------
def test_a_key_open_to_other_users_is_refused(pki: PKI, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(pki.key, key)
    key.chmod(0o644)
    with pytest.raises(BadInput) as e:
        tls_files(pki.cert, key)
    assert "open to every user" in e.value.message and "0644" in e.value.message
    assert e.value.hint and f"chmod 600 {key}" in e.value.hint
    key.chmod(0o640)  # a group (e.g. ssl-cert) may read it
    assert tls_files(pki.cert, key) == TLSFiles(pki.cert, key)


def test_half_a_pair_or_a_wrong_pair_is_refused(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="--tls-cert needs --tls-key"):
        tls_files(pki.cert, None)
    with pytest.raises(BadInput, match="--tls-key needs --tls-cert"):
        tls_files(None, pki.key)
    assert tls_files(None, None) is None
    other = make_pki(tmp_path / "other")
    with pytest.raises(BadInput) as e:
        tls_files(pki.cert, other.key)
    assert "cannot load the TLS certificate" in e.value.message
    assert "PRIVATE KEY" not in str(e.value) and other.key.read_text()[40:80] not in str(e.value)
    with pytest.raises(BadInput, match=r"nokey\.pem: No such file"):
        tls_files(pki.cert, tmp_path / "nokey.pem")


# -- a tiny TLS server: the GitLab driver's stream, the joiner, scheduler -> hostd ---------------
GAP_S = 0.4  # between two chunks of the stream


def _app() -> Flask:
    app = Flask("tiny")

    @app.post("/v1/envs/<name>/run")
    def run(name: str) -> Response:
        def events() -> Iterator[str]:
            for i in range(4):
                ev = ExecEvent.output("stdout", f"{time.monotonic()!r} {i}\n".encode(), "vm1")
                yield json.dumps(ev.to_dict()) + "\n"
                time.sleep(GAP_S)
            yield json.dumps(ExecEvent.exit(ExitStatus(0), "vm1").to_dict()) + "\n"

        return Response(events(), mimetype="application/x-ndjson")

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/v1/host")
    def host() -> dict[str, Any]:
        return {"id": "tiny"}

    @app.post("/v1/hosts/register")
    def register() -> dict[str, Any]:
        return {"id": "tiny", "heartbeat_s": 5}

    return app


@pytest.fixture(scope="module")
def tiny(pki: PKI) -> Iterator[WebServer]:
    srv = make_server(_app(), "127.0.0.1", 0, name="tiny", tls=pki.files, threads=4)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    yield srv
    srv.close()
    t.join(10)


def test_the_exec_stream_over_tls_flows_chunk_by_chunk(pki: PKI, tiny: WebServer) -> None:
    cfg = ClientConfig(f"127.0.0.1:{tiny.port}", "t", pki.ca)  # bare address + CA: https
    assert cfg.url == tiny.url
    got: list[tuple[float, ExecEvent]] = []
    for ev in exec_events(cfg, "env", ExecRequest(("true",))):
        got.append((time.monotonic(), ev))
    assert [e.kind.value for _, e in got] == ["stdout"] * 4 + ["exit"]
    # Each line arrives as it is written: about GAP_S after the one before, never all at the end.
    lag = [arrived - float(e.data.split()[0]) for arrived, e in got[:4]]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    print(f"TLS stream: arrival lag {[f'{x * 1000:.1f}' for x in lag]} ms, gaps {gaps}")
    assert max(lag) < GAP_S / 2, lag
    assert all(g > GAP_S * 0.6 for g in gaps), gaps
    url = f"{tiny.url}/v1/envs/env/run"
    with requests.post(url, json={}, verify=str(pki.ca), timeout=10, stream=True) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"


def test_a_client_without_the_ca_is_refused_clearly(pki: PKI, tiny: WebServer) -> None:
    cfg = ClientConfig(tiny.url, "t")  # https://, no CA: the system's trust store
    for call in (
        lambda: list(exec_events(cfg, "env", ExecRequest(("true",)))),
        lambda: Client(cfg).status(),
    ):
        with pytest.raises(TTError) as e:
            call()
        assert "presented a TLS certificate that the system's trust store" in e.value.message
        assert "unable to get local issuer certificate" in e.value.message
        assert e.value.hint and "TT_CA_FILE" in e.value.hint


def test_the_ca_wins_over_requests_ca_bundle(
    pki: PKI, tiny: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests lets REQUESTS_CA_BUNDLE override a session's verify; ours is passed per request.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    assert Client(ClientConfig(tiny.url, "t", pki.ca)).status() == {"ok": True}


def test_the_ca_comes_from_the_environment_or_the_config(
    pki: PKI, tiny: WebServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ttci.client import config

    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "config.json"))
    config.save(f"127.0.0.1:{tiny.port}", "t", str(pki.ca))
    assert json.loads((tmp_path / "config.json").read_text())["ca"] == str(pki.ca)
    assert config.load().url == tiny.url
    assert Client(config.load()).status() == {"ok": True}
    config.save(None, None, "")  # the CA taken out: a bare address is plain HTTP again
    assert config.load().url == f"http://127.0.0.1:{tiny.port}"
    monkeypatch.setenv("TT_CA_FILE", str(pki.ca))
    assert config.load().ca == pki.ca
    monkeypatch.setenv("TT_CA_FILE", str(tmp_path / "nope.pem"))
    with pytest.raises(BadInput, match=r"TT_CA_FILE .*nope\.pem does not exist"):
        config.load()


def test_plain_http_to_the_tls_port_is_told_to_use_https(tiny: WebServer) -> None:
    r = requests.get(f"http://127.0.0.1:{tiny.port}/v1/status", timeout=10)
    assert r.status_code == 400 and "serves HTTPS" in r.json()["error"]
    with pytest.raises(TTError) as e:  # our client shows the server's words
        Client(ClientConfig(f"http://127.0.0.1:{tiny.port}", "t")).status()
    assert "serves HTTPS" in e.value.message


def test_the_tls_server_keeps_waitresss_limits(pki: PKI, tiny: WebServer) -> None:
    big = {"X-Big": "x" * 300_000}  # waitress refuses headers over 256 KiB; so does the TLS server
    r = requests.get(f"{tiny.url}/v1/status", headers=big, verify=str(pki.ca), timeout=10)
    assert r.status_code in (413, 431), r.status_code


def test_a_silent_connection_delays_nobody(pki: PKI, tiny: WebServer) -> None:
    silent = [socket.create_connection(("127.0.0.1", tiny.port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert Client(ClientConfig(tiny.url, "t", pki.ca)).status() == {"ok": True}
        assert time.monotonic() - t0 < 2  # the handshakes wait in workers, not the accept loop
    finally:
        for s in silent:
            s.close()


def _joiner(url: str, ca: Path | None) -> Joiner:
    return Joiner(
        scheduler=url,
        join_token=JOIN,
        host_id="tiny",
        advertise_url="https://127.0.0.1:1",
        host_token="h" * 20,
        info=dict,
        ca=ca,
    )


def test_the_joiner_verifies_the_scheduler(pki: PKI, tiny: WebServer) -> None:
    _joiner(tiny.url, pki.ca).register()
    with pytest.raises(JoinRefused) as e:
        _joiner(tiny.url, None).start()  # fatal at once: no quiet retrying
    assert "does not verify" in e.value.message and "--ca" in (e.value.hint or "")


def test_the_scheduler_verifies_hosts(
    pki: PKI, tiny: WebServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(HostdClient, "ca", None)
    with pytest.raises(HostUnreachable) as e:
        HostdClient("tiny", tiny.url, "tok").info()
    assert "TLS failed" in e.value.message and "127.0.0.1" not in e.value.message
    assert "does not verify" in caplog.text  # the operator's log says why
    HostdClient.trust(pki.ca)
    assert HostdClient("tiny", tiny.url, "tok").info() == {"id": "tiny"}


# -- real daemons: a TLS scheduler, a hostd that joins over https, a static https hostd ----------
@dataclass
class Cloud:
    addr: str  # the scheduler's 127.0.0.1:PORT
    state: Path
    pki: PKI

    def tt(self, *args: str, ca: bool = True, server: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TT_")}
        env |= {"TT_SERVER": server or self.addr, "TT_TOKEN": ADMIN}
        env |= {"TT_CONFIG": str(self.state / "no-config.json")}
        if ca:
            env["TT_CA_FILE"] = str(self.pki.ca)
        return subprocess.run(
            [*python_main("ttci.cli.main"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _hostd_argv(state: Path, port: int, host_id: str, pki: PKI, *extra: str) -> list[str]:
    return [
        *python_main("hostd.cli.main"),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--image-path",
        str(IMAGE_PATH),
        "--host-id",
        host_id,
        "--private-libvirtd",
        "--cpu-total",
        "2",
        "--mem-total",
        "2048",
        "--tls-cert",
        str(pki.cert),
        "--tls-key",
        str(pki.key),
        *extra,
    ]


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cloud(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    state = tmp_path_factory.mktemp("tlscloud")
    sport, static_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # tls-s is static: the scheduler reaches it at a bare address, https because of its CA.
        procs.append(
            _spawn(
                _hostd_argv(state / "tls-s", static_port, "tls-s", pki),
                {**BASE_ENV, "TT_HOSTD_TOKEN": HOSTD},
                state / "tls-s.log",
                "tt-hostd tls-s",
            )
        )
        sched_env = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN}
        sched_env |= {"TT_HOSTD_TOKEN": HOSTD, "TT_CA_FILE": str(pki.ca)}
        procs.append(
            _spawn(
                [
                    *python_main("ttci.scheduler.web.serve"),
                    "--listen",
                    f"127.0.0.1:{sport}",
                    "--state-dir",
                    str(state),
                    "--server-set",
                    f"tls-s=127.0.0.1:{static_port}",
                    "--tls-cert",
                    str(pki.cert),
                    "--tls-key",
                    str(pki.key),
                ],
                sched_env,
                state / "scheduler.log",
                "tt-scheduler",
            )
        )
        # tls-j joins: a bare --join address with --ca means https; it advertises https.
        procs.append(
            _spawn(
                _hostd_argv(
                    state / "tls-j",
                    free_port(),
                    "tls-j",
                    pki,
                    "--join",
                    f"127.0.0.1:{sport}",
                    "--ca",
                    str(pki.ca),
                ),
                {**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24), "TT_JOIN_TOKEN": JOIN},
                state / "tls-j.log",
                "tt-hostd tls-j",
            )
        )
        yield Cloud(f"127.0.0.1:{sport}", state, pki)
    finally:
        for p in reversed(procs):
            stop(p, grace=STOP_GRACE_S)


def _hosts(cloud: Cloud) -> dict[str, dict[str, Any]]:
    r = cloud.tt("status", "--server", "--json")
    assert r.returncode == 0, r.stderr
    return {h["id"]: h for h in json.loads(r.stdout)}


def test_tt_with_the_ca_sees_both_hosts_up_over_https(cloud: Cloud) -> None:
    _wait(
        lambda: {h: v["state"] for h, v in _hosts(cloud).items()} == {"tls-j": "up", "tls-s": "up"},
        "tls-j (joined) and tls-s (static) up",
    )
    hosts = _hosts(cloud)
    assert hosts["tls-j"]["url"].startswith("https://127.0.0.1:")  # advertised by tls-j itself
    assert hosts["tls-s"]["url"].startswith("https://127.0.0.1:")  # the scheduler polls it
    r = cloud.tt("status", "--server")
    assert r.returncode == 0 and "tls-j" in r.stdout and "tls-s" in r.stdout, r.stderr


def test_the_schedulers_progress_stream_flows_over_https(cloud: Cloud) -> None:
    """A queued ENV's NDJSON stream: the first line comes while the request is still open,
    the last one right after the ENV is withdrawn (nothing waits for the stream's end)."""
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ADMIN}"
    base = f"https://{cloud.addr}"

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        # verify on each call: REQUESTS_CA_BUNDLE in the environment beats a session's verify
        return api.request(method, base + path, verify=str(cloud.pki.ca), timeout=30, **kw)

    _wait(lambda: len(_hosts(cloud)) == 2, "both hosts")
    for hid in ("tls-j", "tls-s"):
        assert call("POST", f"/v1/hosts/{hid}/drain").json()["drained"] is True
    try:
        body = {"name": "tls-q", "os_prefix": "debian-12:amd64"}
        t0 = time.monotonic()
        with call("POST", "/v1/envs?progress=1", json=body, stream=True) as s:
            assert s.headers.get("Transfer-Encoding") == "chunked"
            lines = s.iter_lines()
            first = json.loads(next(lines))
            t_first = time.monotonic() - t0
            assert first["event"] == "queued" and first["blocked_by"] == "no_host", first
            t1 = time.monotonic()
            assert call("DELETE", "/v1/envs/tls-q").json()["was"] == "queued"
            rest = [json.loads(line) for line in lines if line]
            t_last = time.monotonic() - t1
        assert rest[-1]["event"] == "error" and "cancelled" in rest[-1]["error"], rest
        print(f"progress over TLS: first line {t_first:.3f} s, last {t_last:.3f} s after DELETE")
        assert t_first < 5 and t_last < 5
    finally:
        for hid in ("tls-j", "tls-s"):
            call("POST", f"/v1/hosts/{hid}/undrain")


def test_tt_without_the_ca_is_refused_with_a_clear_error(cloud: Cloud) -> None:
    r = cloud.tt("status", "--server", ca=False, server=f"https://{cloud.addr}")
    assert r.returncode == 1, r
    assert "does not verify" in r.stderr and "TT_CA_FILE" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = cloud.tt("status", ca=False)  # a bare address without a CA: plain HTTP, told to use TLS
    assert r.returncode != 0 and "serves HTTPS" in r.stderr, r.stderr


def test_a_hostd_without_the_ca_cannot_join(cloud: Cloud) -> None:
    r = subprocess.run(
        _hostd_argv(
            cloud.state / "tls-x",
            free_port(),
            "tls-x",
            cloud.pki,
            "--join",
            f"https://{cloud.addr}",
        ),
        env={**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24), "TT_JOIN_TOKEN": JOIN},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    assert "does not verify" in r.stderr and "--ca" in r.stderr, r.stderr
    assert "tls-x" not in _hosts(cloud)


# -- the webhook service over https, calling the https scheduler -------------------------------
def test_the_webhook_service_over_https_takes_a_signed_delivery(cloud: Cloud) -> None:
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    env = {**BASE_ENV, "TT_GH_WEBHOOK_SECRET": SECRET, "TT_GH_TOKEN": "ghp_unused"}
    env |= {"TT_SERVER": cloud.addr, "TT_TOKEN": ADMIN, "TT_GH_ADMIN_TOKEN": ADMIN}
    env |= {"TT_CONFIG": str(cloud.state / "no-config.json")}
    argv = [*python_main("webhooks.cli"), "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--state-dir", str(cloud.state / "gh"), "--api-url", "http://127.0.0.1:9"]
    argv += ["--tls-cert", str(cloud.pki.cert), "--tls-key", str(cloud.pki.key)]
    argv += ["--ca", str(cloud.pki.ca)]  # the scheduler's bare address: https, verified
    log = (cloud.state / "gh.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ca = str(cloud.pki.ca)

        def up() -> bool:
            try:
                return requests.get(f"{base}/healthz", verify=ca, timeout=2).ok
            except requests.ConnectionError:
                return False

        _wait(up, "the webhook service")

        def send(payload: Any, event: str, secret: str | None = SECRET) -> requests.Response:
            raw = json.dumps(payload, separators=(",", ":")).encode()
            h = headers(event, raw, secret.encode() if secret else None)
            return requests.post(f"{base}/webhook", data=raw, headers=h, verify=ca, timeout=10)

        assert send({"zen": "hi", "hook_id": 1}, "ping").json() == {"status": "pong"}
        assert send({"zen": "hi"}, "ping", secret=None).status_code == 401
        # A job of ours for an OS no host has: the service asks the scheduler (over https with
        # the CA), which refuses; that refusal, not "cannot reach", is what the job records.
        event = job_event("queued", 4711, ["self-hosted", "tt", "debian-99", "x64"])
        assert send(event, "workflow_job").status_code < 300
        auth = {"Authorization": f"Bearer {ADMIN}"}

        def reason() -> str:
            rows = requests.get(f"{base}/jobs", headers=auth, verify=ca, timeout=5).json()
            return str(next((j.get("reason") for j in rows if j["id"] == 4711), ""))

        outcome = ("debian-99", "reach", "TLS", "certificate")  # the scheduler's word, or none
        _wait(lambda: any(w in reason() for w in outcome), "the job's outcome", timeout=60)
        assert "debian-99" in reason() and "reach" not in reason(), reason()
    finally:
        stop(proc, grace=30)
        log.close()
    text = (cloud.state / "gh.log").read_text()
    assert "PRIVATE KEY" not in text and ADMIN not in text and SECRET not in text
