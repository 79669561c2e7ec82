"""DNS and egress allow-lists with real VMs: a hostd in a lab namespace ("h1") joins a scheduler on
the lab bridge; an "outside" namespace holds the only DNS server (authoritative for test.lan, it
forwards nothing), a git smart-HTTP server that wants the GitLab job token and two plain HTTP
servers. VMs resolve through their ENV's forwarder, which forwards only to that server; nothing
in the lab has a route anywhere else, and a witness table in h1 counts any packet the host
namespace sends or forwards to an address outside the lab (link-local multicast such as IGMP
reports of new bridges aside; docs/facts/networking.md: network safety).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from hostd.images.guest_files import RESOLV_PLACEHOLDER
from hostd.net.dns import find_processes
from tests.cloudutil import configure_client, qemu_pids, tt
from tests.conftest import IMAGE_PATH, built_image
from tests.github.e2e import github_service
from tests.github.util import RUN_SH
from tests.gitlab.harness import Job, Runner
from tests.netlab import Lab, dns_server, in_ns, lab, lab_servers
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

ADMIN = "admin-" + secrets.token_urlsafe(12)
JOIN = "join-" + secrets.token_urlsafe(12)
JOB_TOKEN = "glcbt-" + secrets.token_hex(10)
HOSTD_PORT = 7420
DRIVER = str(Path(sys.executable).parent / "tt-gitlab-executor")
IMAGE = "debian-12:amd64"


@dataclass
class Cloud:
    lab: Lab
    state: Path
    cfg: Path
    dns: str
    git: str
    web: str
    other: str
    sha: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hostd: subprocess.Popen[bytes] | None = None

    @property
    def h1(self) -> str:
        return f"tl{self.lab.tag}h1"

    @property
    def hostd_addr(self) -> str:
        return self.lab.addr(11)

    def tt(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return tt(*args, config=self.cfg, timeout=timeout)

    def add(self, env: str, *flags: str) -> dict[str, Any]:
        r = self.tt("env", "add", env, "--os-prefix", IMAGE, "--mem", "384", *flags)
        assert r.returncode == 0, r.stderr
        return self.show(env)

    def show(self, env: str) -> dict[str, Any]:
        r = self.tt("env", "show", env, "--json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def on(self, env: str, cmd: str, timeout: float = 180) -> tuple[int, str]:
        r = self.tt("env", "run", env, "--cmd", cmd, timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    def delete(self, env: str) -> None:
        assert self.tt("env", "del", env).returncode == 0

    def clone_url(self) -> str:
        return f"http://gitlab-ci-token:{JOB_TOKEN}@git.test.lan/group/project.git"


def _repo(root: Path) -> str:
    """A bare repository group/project.git under root with one commit; its SHA."""
    work = root / "work"
    work.mkdir(parents=True)
    (work / "README").write_text("hello from the lab repo\n")
    git = ["git", "-c", "user.name=tt", "-c", "user.email=tt@test.lan", "-C", str(work)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    bare = root / "srv/group/project.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


WITNESS = """table inet tt_witness {{
  set lab {{ type ipv4_addr; flags interval; elements = {{ {lab}, 10.213.0.0/16, 127.0.0.0/8,
    224.0.0.0/24, 255.255.255.255 }}; }}
  set local6 {{ type ipv6_addr; flags interval; elements = {{ ::1, fe80::/10, ff00::/8 }}; }}
  set where4 {{ type ipv4_addr . inet_proto; flags dynamic; size 1024; }}
  set where6 {{ type ipv6_addr . inet_proto; flags dynamic; size 1024; }}
  counter escaped {{}}
  chain output {{
    type filter hook output priority 0; policy accept;
    ip daddr != @lab add @where4 {{ ip daddr . meta l4proto }} counter name "escaped"
    ip6 daddr != @local6 add @where6 {{ ip6 daddr . meta l4proto }} counter name "escaped"
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip daddr != @lab add @where4 {{ ip daddr . meta l4proto }} counter name "escaped"
    ip6 daddr != @local6 add @where6 {{ ip6 daddr . meta l4proto }} counter name "escaped"
  }}
}}
"""


def _escaped(ns: str) -> tuple[int, str]:
    """Packets the namespace sent or forwarded outside the lab, and to where."""
    doc = json.loads(in_ns(ns, "nft", "-j", "list", "counter", "inet", "tt_witness", "escaped"))
    n = int(next(i["counter"]["packets"] for i in doc["nftables"] if "counter" in i))
    where = "".join(
        in_ns(ns, "nft", "list", "set", "inet", "tt_witness", s) for s in ("where4", "where6")
    )
    return n, where


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("dnsvm")
    sha = _repo(state / "git")
    with lab() as the_lab:
        bridge = the_lab.up()
        h1 = the_lab.node("h1", 11)
        out = the_lab.node("out", 100)
        (state / "witness.nft").write_text(WITNESS.format(lab=the_lab.subnet))
        in_ns(h1, "nft", "-f", str(state / "witness.nft"))
        c = Cloud(
            the_lab, state, state / "client.json", the_lab.addr(100), the_lab.add_addr("out", 101),
            the_lab.add_addr("out", 102), the_lab.add_addr("out", 103), sha,
        )  # fmt: skip
        sched = None
        try:
            records = {"git.test.lan": c.git, "web.test.lan": c.web, "other.test.lan": c.other}
            c.procs.append(dns_server(out, c.dns, records, state / "upstream-dns.log"))
            c.procs.append(
                lab_servers(
                    out, state / "servers.log", "--git", f"{c.git}:80:{state}/git/srv:{JOB_TOKEN}",
                    "--http", f"{c.web}:80:web", "--http", f"{c.other}:80:other",
                )
            )  # fmt: skip
            sched_addr = f"{bridge}:7400"
            argv = [*python_main("ttci.scheduler.web.serve"), "--listen", sched_addr,
                    "--state-dir", str(state / "sched"), "--host-timeout", "5"]  # fmt: skip
            env = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN}
            sched = _spawn(argv, env, state / "scheduler.log", "tt-scheduler")
            configure_client(sched_addr, ADMIN, c.cfg)
            c.hostd = _start_hostd(c, sched_addr)
            _wait(lambda: "h1" in {h["id"] for h in _hosts(c)}, 90, "h1 to join")
            yield c
        finally:
            if c.hostd:
                stop(c.hostd, grace=STOP_GRACE_S)
            if sched:
                stop(sched, grace=STOP_GRACE_S)
            left = find_processes(state / "h1" / "dns")
            for p in c.procs:
                stop(p, grace=2)
                if p.stdout:
                    p.stdout.close()
            starts = re.findall(r"VM (\S+) up in \S+ s \((\w+)", (state / "h1.log").read_text())
            print("VM starts (name, cold or warm):", starts)
            escaped = _escaped(h1)
            tables = [t for t in in_ns(h1, "nft", "list", "tables").split() if "ttci_" in t]
            links = [x for x in in_ns(h1, "ip", "-o", "link").split() if x.startswith("ttb")]
            forward = in_ns(h1, "cat", "/proc/sys/net/ipv4/ip_forward").strip()
            assert qemu_pids(str(state / "h1")) == []
            assert (left, tables, links, forward) == ({}, [], [], "0")
            assert escaped[0] == 0, f"packets of the host namespace left the lab: {escaped}"


def _start_hostd(c: Cloud, sched_addr: str) -> subprocess.Popen[bytes]:
    argv = [
        "nsenter", f"--net=/run/netns/{c.h1}", *python_main("hostd.cli.main"), "serve",
        "--listen", f"{c.hostd_addr}:{HOSTD_PORT}", "--state-dir", str(c.state / "h1"),
        "--image-path", str(IMAGE_PATH), "--host-id", "h1", "--private-libvirtd",
        "--cpu-total", "2", "--mem-total", "2048", "--outgoing", "allow",
        "--dns", c.dns, "--join", sched_addr,
    ]  # fmt: skip
    env = {**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24), "TT_JOIN_TOKEN": JOIN}
    return _spawn(argv, env, c.state / "h1.log", "tt-hostd")


def _hosts(c: Cloud) -> list[dict[str, Any]]:
    r = c.tt("status", "--server", "--json")
    return list(json.loads(r.stdout)) if r.returncode == 0 else []


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _connect(addr: str, port: int) -> str:
    code = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=3)"
    return f"python3 -c \"{code}; print('connected')\""


LOOKUP_TIMES = """python3 - <<'EOF'
import socket, time
try:  # loads the resolver's libraries (slow under TCG) with a name that is refused at once
    socket.getaddrinfo("other.test.lan", 80, socket.AF_INET, socket.SOCK_STREAM)
except OSError:
    pass
for name in ("git.test.lan", "git.test.lan"):
    t = time.monotonic()
    socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    print("lookup_ms", round((time.monotonic() - t) * 1000, 2))
EOF"""


def test_a_vm_resolves_through_its_forwarder_and_reaches_only_the_allowed_name(
    cloud: Cloud,
) -> None:
    env = cloud.add("ea", "--allow-egress", "git.test.lan")
    (vm,) = env["vms"]
    gateway = vm["ip"].rsplit(".", 1)[0] + ".1"
    rc, text = cloud.on("ea", "cat /etc/resolv.conf")
    assert rc == 0 and f"nameserver {gateway}\n" in text, text
    rc, text = cloud.on("ea", LOOKUP_TIMES)
    assert rc == 0, text
    print("first and cached lookup in the VM (ms):", re.findall(r"lookup_ms (\S+)", text))
    rc, text = cloud.on("ea", "getent hosts git.test.lan")
    assert rc == 0 and cloud.git in text, text
    rc, text = cloud.on("ea", "getent hosts other.test.lan")
    assert rc != 0, text  # a name off the list does not resolve
    rc, text = cloud.on(
        "ea", f"git clone -q {cloud.clone_url()} /tmp/p && git -C /tmp/p rev-parse HEAD"
    )
    assert rc == 0 and cloud.sha in text, text
    for addr in (cloud.other, cloud.web):  # nor by address
        rc, text = cloud.on("ea", _connect(addr, 80))
        assert rc != 0 and "connected" not in text, (addr, text)
    egress = cloud.show("ea")["egress"]
    assert (egress["mode"], egress["allow"]) == ("enforce", ["git.test.lan"])
    assert egress["denied"] >= 2
    where = {(b["addr"], b["port"]) for b in egress["blocked"]}
    assert {(cloud.other, 80), (cloud.web, 80)} <= where
    shown = cloud.tt("env", "show", "ea").stdout
    assert "egress: enforce, allowed git.test.lan" in shown and f"{cloud.other}:80/tcp" in shown
    metrics = requests.get(f"http://{cloud.hostd_addr}:{HOSTD_PORT}/metrics", timeout=10).text
    series = 'ttci_hostd_egress_denied_connections_total{env="ea",mode="enforce"} '
    m = re.search(re.escape(series) + r"(\S+)", metrics)
    assert m and float(m[1]) >= 2, metrics
    cloud.delete("ea")


def test_audit_mode_lets_everything_through_and_names_what_the_list_would_block(
    cloud: Cloud,
) -> None:
    (vm,) = cloud.add("eb", "--allow-egress", "git.test.lan", "--egress-audit")["vms"]
    rc, text = cloud.on("eb", "cat /etc/resolv.conf")  # also after a warm start (IDENTITY)
    assert rc == 0 and f"nameserver {vm['ip'].rsplit('.', 1)[0]}.1\n" in text, text
    url = "http://other.test.lan/"
    get = f"python3 -c \"import urllib.request as u; print(u.urlopen('{url}').read().decode())\""
    rc, text = cloud.on("eb", get)
    assert rc == 0 and "hello from other" in text, text
    rc, text = cloud.on("eb", f"git clone -q {cloud.clone_url()} /tmp/p && echo cloned")
    assert rc == 0 and "cloned" in text, text
    egress = cloud.show("eb")["egress"]
    assert egress["mode"] == "audit" and egress["denied"] >= 1
    [b] = egress["blocked"]
    assert (b["addr"], b["port"], b["names"]) == (cloud.other, 80, ["other.test.lan"])
    shown = cloud.tt("env", "show", "eb").stdout
    assert f"would have denied: other.test.lan {cloud.other}:80/tcp" in shown, shown
    cloud.delete("eb")
    log = (cloud.state / "h1.log").read_text()
    assert re.search(r"ENV eb egress \(audit\): \d+ denied; other\.test\.lan", log), log[-3000:]


def test_a_denied_outgoing_env_resolves_nothing(cloud: Cloud) -> None:
    cloud.add("ec", "--deny-outgoing")
    rc, text = cloud.on("ec", "cat /etc/resolv.conf; getent hosts git.test.lan; echo rc=$?")
    assert rc == 0 and "nameserver" not in text and "rc=2" in text, text
    assert "egress" not in cloud.show("ec")
    cloud.delete("ec")


def test_a_gitlab_job_fetches_its_sources_by_name_with_the_job_token(cloud: Cloud) -> None:
    job = Job(
        4201,
        ['echo "checked out $(git rev-parse HEAD)"', "cat README"],
        variables={"TT_OS": "debian-12", "TT_ARCH": "amd64", "TT_ALLOW_EGRESS": "git.test.lan"},
        repo_url="http://git.test.lan/group/project.git",
        sha=cloud.sha,
        token=JOB_TOKEN,
    )
    runner = Runner(
        [DRIVER, "--memory", "384"], env={"TT_CONFIG": str(cloud.cfg)}, prepare_retry_delay=0
    )
    r = runner.run_job(job)
    text = r.text()
    assert r.status == "success", text
    assert "Created fresh repository." in text and f"checked out {cloud.sha}" in text
    assert "hello from the lab repo" in text
    requests_seen = [json.loads(x) for x in (cloud.state / "servers.log").read_text().splitlines()]
    fetched = [x for x in requests_seen if x["server"] == "git" and x["authed"]]
    assert fetched and all(x["peer"] == cloud.hostd_addr for x in fetched)  # NATed by h1
    assert json.loads(cloud.tt("env", "list", "--json").stdout) == []


RECORD, PROBED = "/tmp/tt-runner-record", "/tmp/tt-runner-egress"
RUNNER_PROBE = """#!/bin/sh
# The stand-in GitHub runner, first reaching out as the real one reaches its endpoints: by name,
# through the ENV's forwarder and allow-list. One line per attempt in /tmp/tt-runner-egress.
cat > /tmp/tt-probe.py <<'PY'
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode().strip()
        print(url, "ok", body, flush=True)
    except Exception as e:
        print(url, "failed", type(e).__name__, flush=True)
PY
python3 /tmp/tt-probe.py http://web.test.lan/ http://other.test.lan/ http://{other}/ \\
  > /tmp/tt-runner-egress.part 2>&1
mv /tmp/tt-runner-egress.part /tmp/tt-runner-egress
"""


def test_a_github_job_runner_reaches_its_endpoint_by_name_through_the_allow_list(
    cloud: Cloud, tmp_path: Path
) -> None:
    """tt-github-webhooks with --allow-egress web.test.lan (standing in for GitHub's endpoints):
    the job's runner reaches web.test.lan by name, while a name off the list does not resolve
    and an address off it is blocked (and named in the ENV's egress report)."""
    run_sh = tmp_path / "run.sh"
    standin = RUN_SH.read_text().split("\n", 1)[1]  # without its #! line
    run_sh.write_text(RUNNER_PROBE.format(other=cloud.other) + standin)
    jid, repo = 86000, "octo-org/egress"
    since = time.time()
    with github_service(
        cloud.state / "github", f"{cloud.lab.addr(1)}:7400", ADMIN,
        *("--allow-egress", "web.test.lan"), run_sh=run_sh,
    ) as side:  # fmt: skip
        side.queue(jid, repo)
        side.wait("its runner", lambda: side.jobs()[jid]["state"] == "started", timeout=300)
        env = side.jobs()[jid]["env"]
        probe = ""
        deadline = time.monotonic() + 60
        while not probe and time.monotonic() < deadline:
            # the probe's lines, once run.sh has also written its record (for side.finish)
            probe = side.in_vm(env, f"grep -qs allow_root= {RECORD} && cat {PROBED} || true")
            time.sleep(0.5)
        assert "http://web.test.lan/ ok hello from web" in probe, probe
        assert "http://other.test.lan/ failed" in probe, probe  # the name does not resolve
        assert f"http://{cloud.other}/ failed" in probe, probe  # nor is the address reached
        egress = side.tt.show_env(env)["egress"]
        assert (egress["mode"], egress["allow"]) == ("enforce", ["web.test.lan"]), egress
        assert (cloud.other, 80) in {(b["addr"], b["port"]) for b in egress["blocked"]}, egress
        side.finish(jid, repo)
        side.wait("the job done", lambda: side.jobs()[jid]["state"] == "done", timeout=120)
        assert side.jobs()[jid]["conclusion"] == "success"
        assert side.jit_calls() == {f"tt-{jid}-1": 1}
        side.wait("its ENV gone", lambda: not side.env_exists(env), timeout=120)
    seen = [json.loads(x) for x in (cloud.state / "servers.log").read_text().splitlines()]
    seen = [x for x in seen if x["t"] >= since]
    assert [(x["server"], x["peer"]) for x in seen] == [("web", cloud.hostd_addr)]  # NATed by h1


@pytest.mark.image
def test_an_image_carries_no_resolver_of_the_machine_that_built_it(tmp_path: Path) -> None:
    image = built_image("debian-12", "amd64")
    raw = tmp_path / "disk.raw"
    qcow = image.file(image.manifest.disk.path)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow), str(raw)], check=True)
    debugfs = shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin") or "debugfs"
    r = subprocess.run([debugfs, "-R", "cat /etc/resolv.conf", str(raw)], capture_output=True)
    assert r.stdout == RESOLV_PLACEHOLDER, r.stdout + r.stderr
    ours = re.findall(r"^nameserver\s+(\S+)", Path("/etc/resolv.conf").read_text(), re.M)
    assert b"nameserver" not in r.stdout and not any(a.encode() in r.stdout for a in ours)
