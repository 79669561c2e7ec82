"""Many hosts, one cloud, for real: three hostds in network namespaces this test creates (veth on
a lab bridge), each joining the scheduler with a join token; real VMs on several of them; real
packets between VMs, an "outside" namespace and the control plane; a host's cable pulled
mid-ENV; the scheduler killed and restarted; and nothing left in any namespace afterwards.

No namespace has a default route and the VMs' only way out is their host's namespace, so no
packet can leave for an address this test did not create (docs/facts/networking.md: network safety).
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.cloudutil import BIN, configure_client, qemu_pids, tt
from tests.conftest import IMAGE_PATH, built_image
from tests.netlab import Lab, in_ns, lab
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.infra.proc import BASE_ENV, stop

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

HOSTS = ("h1", "h2", "h3")
HOSTD_PORT = 7420
OUT_PORT = 9000
ADMIN = "admin-" + secrets.token_urlsafe(12)
JOIN = "join-" + secrets.token_urlsafe(12)

OUTSIDE_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {OUT_PORT}))
s.listen()
while True:
    c, a = s.accept()
    c.sendall(b"outside saw " + a[0].encode())
    c.close()
"""

VM_SERVER = """cat > /tmp/srv.py <<'EOF'
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
while True:
    c, a = s.accept()
    c.sendall(b"vm says hi to " + a[0].encode())
    c.close()
EOF
nohup python3 /tmp/srv.py >/dev/null 2>&1 &
sleep 1"""


def reach_cmd(addr: str, port: int) -> str:
    """Prints "connected" only when a TCP connection is accepted."""
    code = (
        f"import socket; socket.create_connection(({addr!r}, {port}), timeout=3); "
        "print('connected')"
    )
    return f'python3 -c "{code}"'


def connect_cmd(addr: str, port: int) -> str:
    """A shell command (for a VM or a namespace) that connects and prints what it hears."""
    code = (
        f"import socket; s = socket.create_connection(({addr!r}, {port}), timeout=3); "
        "print(s.recv(100).decode())"
    )
    return f'python3 -c "{code}"'


@dataclass
class Cloud:
    lab: Lab
    state: Path
    sched_addr: str
    cfg: Path
    sched: subprocess.Popen[bytes] | None = None
    hostds: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ns: dict[str, str] = field(default_factory=dict)

    def host_addr(self, hid: str) -> str:
        return self.lab.addr(10 + HOSTS.index(hid) + 1)

    def start_scheduler(self) -> None:
        argv = [
            *python_main("ttci.scheduler.web.serve"),
            "--listen",
            self.sched_addr,
            "--state-dir",
            str(self.state),
            "--host-timeout",
            "3",
        ]
        env = {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": JOIN}
        self.sched = _spawn(argv, env, self.state / "scheduler.log", "tt-scheduler")

    def start_hostd(self, hid: str) -> None:
        # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup controllers
        # libvirt needs to apply the VMs' limits.
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.ns[hid]}",
            *python_main("hostd.cli.main"),
            "serve",
            "--listen",
            f"{self.host_addr(hid)}:{HOSTD_PORT}",
            "--state-dir",
            str(self.state / hid),
            "--image-path",
            str(IMAGE_PATH),
            "--host-id",
            hid,
            "--private-libvirtd",
            "--cpu-total",
            "2",
            "--mem-total",
            "2048",
            "--outgoing",
            "allow",
            "--dns",
            "none",  # no forwarder: the only DNS a test may use is one it runs itself
            "--join",
            self.sched_addr,
        ]
        env = {**BASE_ENV, "TT_HOSTD_TOKEN": secrets.token_urlsafe(24), "TT_JOIN_TOKEN": JOIN}
        self.hostds[hid] = _spawn(argv, env, self.state / f"{hid}.log", "tt-hostd")

    def tt(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return tt(*args, config=self.cfg, timeout=timeout)

    def show(self, env: str) -> dict[str, dict[str, object]]:
        r = self.tt("env", "show", env, "--json")
        assert r.returncode == 0, r.stderr
        return {v["name"]: v for v in json.loads(r.stdout)["vms"]}

    def hosts(self) -> dict[str, dict[str, object]]:
        r = self.tt("status", "--server", "--json")
        assert r.returncode == 0, r.stderr
        return {h["id"]: h for h in json.loads(r.stdout)}

    def on(self, env: str, vm: str, cmd: str, timeout: float = 120) -> tuple[int, str]:
        r = self.tt("env", "run", env, "--vm", vm, "--cmd", cmd, timeout=timeout)
        return r.returncode, r.stdout + r.stderr


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def our_net_leftovers(ns: str) -> list[str]:
    tables = [t for t in in_ns(ns, "nft", "list", "tables").split() if t.startswith("ttci_")]
    links = [
        line.split(":")[1].strip()
        for line in in_ns(ns, "ip", "-o", "link").splitlines()
        if line.split(":")[1].strip().startswith(("ttb", "ttt"))
    ]
    forward = in_ns(ns, "cat", "/proc/sys/net/ipv4/ip_forward").strip()
    return tables + links + ([] if forward == "0" else ["ip_forward still 1"])


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    built_image("debian-12", "amd64")
    state = tmp_path_factory.mktemp("multihost")
    with lab() as the_lab:
        bridge_addr = the_lab.up()
        c = Cloud(the_lab, state, f"{bridge_addr}:7400", state / "client.json")
        for i, hid in enumerate(HOSTS):
            c.ns[hid] = the_lab.node(hid, 11 + i)
        c.ns["out"] = the_lab.node("out", 100)
        outside = subprocess.Popen(
            ["ip", "netns", "exec", c.ns["out"], "python3", "-c", OUTSIDE_SERVER]
        )
        try:
            c.start_scheduler()
            configure_client(c.sched_addr, ADMIN, c.cfg)
            for hid in HOSTS:
                c.start_hostd(hid)
            wait_for(lambda: set(HOSTS) <= set(c.hosts()), 60, "three hosts to join")
            yield c
        finally:
            for hid, p in c.hostds.items():
                stop(p, grace=STOP_GRACE_S)
                assert qemu_pids(str(state / hid)) == [], f"QEMU left on {hid}"
            if c.sched:
                stop(c.sched, grace=STOP_GRACE_S)
            stop(outside, grace=0)
            leftovers = {hid: our_net_leftovers(c.ns[hid]) for hid in HOSTS}
            assert leftovers == {hid: [] for hid in HOSTS}


def test_status_shows_every_host_and_the_pool_acts_as_one(cloud: Cloud) -> None:
    hosts = cloud.hosts()
    for hid in HOSTS:
        assert hosts[hid]["state"] == "up" and hosts[hid]["kind"] == "registered"
        assert hosts[hid]["accel"] in ("kvm", "tcg")
        assert "qemu:debian-12:amd64" in {i["name"] for i in hosts[hid]["images"]}
    r = cloud.tt("status", "--server")
    assert all(hid in r.stdout for hid in HOSTS), r.stdout
    # An ENV bigger than the whole pool is refused at once, the reason stated for the whole ENV
    # (what it needs in all, what the hosts offer), and leaves nothing behind.
    r = cloud.tt("env", "add", "huge", "--os-prefix", "debian-12:amd64", "--dup-each", "40")
    said = " ".join(r.stderr.split())  # the CLI may wrap the sentence
    assert r.returncode != 0, r.stderr
    whole = r"the ENV \(40 VMs\) needs 40 CPUs.* in all and the 3 hosts with its images offer 6 CPU"
    assert re.search(whole, said), r.stderr  # (and memory or disk, when those fall short too)
    assert cloud.tt("env", "show", "huge").returncode != 0


def test_envs_spread_over_hosts_with_nat_ports_and_isolation(cloud: Cloud) -> None:
    # ENV a: two VMs, NAT out, port 8080 mapped. They land on two different hosts.
    r = cloud.tt(
        "env", "add", "a", "--os-prefix", "debian-12:amd64", "--dup-each", "2",
        "--mem", "384", "--vm-port", "8080",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    a = cloud.show("a")
    assert len({v["host"] for v in a.values()}) == 2, a
    # ENV b: denied outgoing, on the same host as one of a's VMs (the third host is drained).
    spare = ({"h1", "h2", "h3"} - {str(v["host"]) for v in a.values()}).pop()
    assert cloud.tt("host", "drain", spare).returncode == 0
    try:
        r = cloud.tt(
            "env", "add", "b", "--os-prefix", "debian-12:amd64", "--mem", "384",
            "--deny-outgoing",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        assert cloud.tt("host", "undrain", spare).returncode == 0
    b_vm = next(iter(cloud.show("b").values()))
    neighbour = next(n for n, v in a.items() if v["host"] == b_vm["host"])
    host_of = {n: str(v["host"]) for n, v in a.items()}
    out = cloud.lab.addr(100)

    # NAT: each of a's VMs reaches "outside", which sees its host's address, not the VM's.
    for name, hid in host_of.items():
        rc, text = cloud.on("a", name, connect_cmd(out, OUT_PORT))
        assert rc == 0 and f"outside saw {cloud.host_addr(hid)}" in text, text
    # --deny-outgoing: b's VM reaches nothing outside its ENV.
    rc, text = cloud.on("b", str(b_vm["name"]), connect_cmd(out, OUT_PORT))
    assert rc != 0, text

    # Port map: "outside" reaches a VM's 8080 through the host port tt env show names.
    assert cloud.on("a", neighbour, VM_SERVER)[0] == 0
    (pm,) = a[neighbour]["ports"]
    hid = host_of[neighbour]
    assert pm["vm_port"] == 8080 and pm["host"] == cloud.host_addr(hid)
    reply = in_ns(cloud.ns["out"], "sh", "-c", connect_cmd(cloud.host_addr(hid), pm["host_port"]))
    assert reply.startswith("vm says hi to ")
    # ... and so does a process on the host itself, through its loopback.
    reply = in_ns(cloud.ns[hid], "sh", "-c", connect_cmd("127.0.0.1", pm["host_port"]))
    assert reply.startswith("vm says hi to ")

    # ENV-to-ENV: a's VM cannot reach b's VM on the same host, nor b's reach a's.
    rc, text = cloud.on("a", neighbour, connect_cmd(str(b_vm["ip"]), 8080))
    assert rc != 0 and "vm says hi" not in text
    rc, text = cloud.on("b", str(b_vm["name"]), connect_cmd(str(a[neighbour]["ip"]), 8080))
    assert rc != 0 and "vm says hi" not in text

    # Control plane: no VM reaches its hostd, its gateway, or the scheduler (even with NAT).
    for addr, port in (
        (cloud.host_addr(hid), HOSTD_PORT),
        (str(a[neighbour]["ip"]).rsplit(".", 1)[0] + ".1", HOSTD_PORT),
        (cloud.lab.addr(1), 7400),
    ):
        rc, text = cloud.on("a", neighbour, reach_cmd(addr, port))
        assert rc != 0 and "connected" not in text, (addr, port, text)
    # ... while "outside" (standing in for the scheduler's network) reaches that hostd fine.
    assert "connected" in in_ns(cloud.ns["out"], "sh", "-c", reach_cmd(*hostd_of(cloud, hid)))


def test_a_host_that_vanished_before_placement_is_skipped_and_the_vm_placed_again(
    cloud: Cloud,
) -> None:
    # "ghost" joined (with room for anything) and then died before the scheduler noticed.
    ghost = {
        "id": "ghost",
        "url": f"http://{cloud.lab.addr(99)}:{HOSTD_PORT}",  # nothing answers there
        "api": 1,
        "token": secrets.token_urlsafe(20),
        "info": {
            **{k: cloud.hosts()["h1"][k] for k in ("images", "accel", "machine")},
            "total": {"cpus": 64, "memory_mib": 65536, "disk_gib": 1000},
            "free": {"cpus": 64, "memory_mib": 65536, "disk_gib": 1000},
        },
    }
    r = requests.post(
        f"http://{cloud.sched_addr}/v1/hosts/register",
        json=ghost,
        headers={"Authorization": f"Bearer {JOIN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    r = cloud.tt("env", "add", "g", "--os-prefix", "debian-12:amd64", "--mem", "384")
    assert r.returncode == 0, r.stderr
    assert next(iter(cloud.show("g").values()))["host"] in HOSTS
    assert cloud.hosts()["ghost"]["state"] == "down"
    assert cloud.tt("env", "del", "g").returncode == 0
    assert cloud.tt("host", "forget", "ghost").returncode == 0
    assert "ghost" not in cloud.hosts()


def test_a_host_cut_off_mid_env_is_marked_down_and_the_rest_keep_working(
    cloud: Cloud,
) -> None:
    a = cloud.show("a")
    b_host = str(next(iter(cloud.show("b").values()))["host"])
    victim_vm, victim = next((n, str(v["host"])) for n, v in a.items() if v["host"] != b_host)
    other_vm = next(n for n in a if n != victim_vm)
    cloud.lab.cut(victim)
    try:
        wait_for(lambda: cloud.hosts()[victim]["state"] == "down", 20, f"{victim} down")
        a = cloud.show("a")
        assert a[victim_vm]["state"] == "lost" and victim in str(a[victim_vm]["error"])
        r = cloud.tt("env", "list", "--json")
        assert {e["name"]: e["lost"] for e in json.loads(r.stdout)}["a"] == 1
        # The VM on the other host, and ENV b, go on as if nothing happened.
        rc, text = cloud.on("a", other_vm, "echo still here")
        assert rc == 0 and "still here" in text
        r = cloud.tt("env", "run", "a", "--cmd", "true")
        assert r.returncode != 0 and victim_vm in r.stdout and "lost" in r.stdout
        assert cloud.tt("env", "run", "b", "--cmd", "true").returncode == 0
        # New VMs go elsewhere.
        r = cloud.tt("env", "add", "c", "--os-prefix", "debian-12:amd64", "--mem", "384")
        assert r.returncode == 0, r.stderr
        assert next(iter(cloud.show("c").values()))["host"] != victim
        assert cloud.tt("env", "del", "c").returncode == 0
    finally:
        cloud.lab.cut(victim, down=False)
    # The host comes back with its VM still running: the VM is back too.
    wait_for(lambda: cloud.hosts()[victim]["state"] == "up", 30, f"{victim} back")
    wait_for(lambda: cloud.show("a")[victim_vm]["state"] == "running", 30, "VM back")
    rc, text = cloud.on("a", victim_vm, "echo back again")
    assert rc == 0 and "back again" in text


def test_scheduler_killed_mid_run_loses_nothing(cloud: Cloud) -> None:
    before = {env: cloud.show(env) for env in ("a", "b")}
    run = subprocess.Popen(
        [str(BIN / "tt"), "env", "run", "a", "--cmd", "sleep 4; echo finished"],
        env={**BASE_ENV, "TT_CONFIG": str(cloud.cfg)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(2)
    assert cloud.sched is not None
    cloud.sched.send_signal(signal.SIGKILL)
    cloud.sched.wait()
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "finished" not in out  # the user is told, not left hanging
    assert "scheduler" in err
    cloud.start_scheduler()
    wait_for(lambda: all(h["state"] == "up" for h in cloud.hosts().values()), 30, "hosts up")
    after = {env: cloud.show(env) for env in ("a", "b")}
    assert {e: set(v) for e, v in after.items()} == {e: set(v) for e, v in before.items()}
    for env, vms in after.items():
        for name, vm in vms.items():
            assert vm["state"] == "running" and vm["host"] == before[env][name]["host"]
    r = cloud.tt("env", "run", "a", "--cmd", "echo after restart")
    assert r.returncode == 0 and r.stdout.count("after restart") == 2


def test_vms_are_listed_a_page_at_a_time_or_as_a_stream(cloud: Cloud) -> None:
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ADMIN}"
    base = f"http://{cloud.sched_addr}/v1/envs/a/vms"
    first = api.get(base, params={"limit": 1}, timeout=30).json()
    assert first["total"] == 2 and len(first["vms"]) == 1 and first["next_offset"] == 1
    second = api.get(base, params={"offset": 1, "limit": 1}, timeout=30).json()
    assert second["next_offset"] is None
    assert first["vms"][0]["name"] < second["vms"][0]["name"]
    lines = api.get(base, params={"stream": 1}, timeout=30).text.splitlines()
    assert [json.loads(x)["name"] for x in lines] == sorted(cloud.show("a"))
    r = api.get(base, params={"limit": "lots"}, timeout=30)
    assert r.status_code == 400 and "limit='lots' is not an integer in 1.." in r.json()["error"]


def test_deleting_envs_removes_every_table_bridge_and_tap(cloud: Cloud) -> None:
    used = {str(v["host"]) for env in ("a", "b") for v in cloud.show(env).values()}
    for env in ("a", "b"):
        r = cloud.tt("env", "del", env)
        assert r.returncode == 0, r.stderr
    for hid in HOSTS:
        assert our_net_leftovers(cloud.ns[hid]) == [], hid
    assert len(used) >= 2  # real VMs ran on at least two hosts


def hostd_of(cloud: Cloud, hid: str) -> tuple[str, int]:
    return cloud.host_addr(hid), HOSTD_PORT
