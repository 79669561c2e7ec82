"""DNS and egress benchmark: what a DNS lookup through an ENV's forwarder adds, and how long a new
ENV's allow-list takes to apply.

    python bench/egress.py [--runs 50] [--envs 5] [--json out.json]

No VMs: hostd's network manager runs in a lab namespace (tests.lab_hostnet, one process per
operation, as a restarted hostd would) and a namespace on the ENV's bridge stands in for a VM.
The only DNS server is the lab's own (authoritative for test.lan, it forwards nothing), and no
namespace has a route out of the lab (docs/facts/networking.md: network safety).

Lookups: direct to that server (through the ENV's NAT) against through the ENV's forwarder, the
first lookup of a name (every name new: the forwarder asks upstream) and a repeated one (from
the forwarder's cache); with an allow-list the forwarder also adds each answer to the ENV's
nftables set before it replies. Apply: the new ENV's first attach (bridge, tap, main table) with
no DNS and no list (--deny-outgoing), with a forwarder and no list, with an enforced list and in
audit mode; the difference to the first is what the forwarder and the list cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from tests.netlab import dns_server, in_ns, lab
from ttci.infra.proc import stop

ROOT = Path(__file__).resolve().parent.parent

ALLOW = "git.test.lan,*.bench.test.lan,10.9.0.0/16:443"
MODES: dict[str, dict[str, Any]] = {
    "deny (no DNS, no list)": {"deny": True},
    "open (forwarder, no list)": {},
    "enforce (forwarder + list)": {"allow": ALLOW},
    "audit (forwarder + list)": {"allow": ALLOW, "audit": True},
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class HostNet:
    def __init__(self, ns: str, state: Path, dns: str) -> None:
        self.ns, self.state, self.dns = ns, state, dns

    def __call__(self, op: str, *args: str, **flags: Any) -> dict[str, Any]:
        argv = ["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m",
                "tests.lab_hostnet", str(self.state), "--dns", self.dns, op, *args]  # fmt: skip
        for k, v in flags.items():
            argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
        out = json.loads(r.stdout.splitlines()[-1])
        return {**out["result"], "_seconds": out["seconds"]}


def lookups(vm_ns: str, server: str, template: str, n: int) -> list[float]:
    r = subprocess.run(
        ["ip", "netns", "exec", vm_ns, sys.executable, "-m", "tests.lab_probe", "dns-many",
         server, template, str(n)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    runs = json.loads(r.stdout)
    bad = [x for x in runs if x.get("rcode") != "NOERROR"]
    assert not bad, bad[:3]
    return [float(x["ms"]) for x in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="lookups per row")
    ap.add_argument("--envs", type=int, default=5, help="new ENVs per mode")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, Any] = {"runs": args.runs, "envs": args.envs}
    with tempfile.TemporaryDirectory() as tmp, lab() as the_lab:
        the_lab.up()
        host = the_lab.node("h", 11)
        out = the_lab.node("o", 100)
        upstream = the_lab.addr(100)
        records = {"git.test.lan": the_lab.addr(101), "bench.test.lan": the_lab.addr(101)}
        procs = [dns_server(out, upstream, records, Path(tmp) / "upstream.log")]
        net = HostNet(host, Path(tmp) / "state", upstream)
        try:
            results["apply_ms"] = apply_times(net, args.envs)
            results["lookup_ms"] = lookup_times(the_lab, net, upstream, args.runs)
        finally:
            net("teardown")
            for p in procs:
                stop(p, grace=2)
            left = in_ns(host, "nft", "list", "tables")
            assert "ttci_" not in left, left
    report(results)
    write_json(args.json, results)


def apply_times(net: HostNet, envs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for i, (mode, flags) in enumerate(MODES.items()):
        times = []
        for j in range(envs):
            r = net("attach", f"b{i}e{j}", f"b{i}v{j}", **flags)
            times.append(r["_seconds"] * 1000)
        out[mode] = times
        for j in range(envs):
            net("detach", f"b{i}v{j}")
    return out


def lookup_times(the_lab: Any, net: HostNet, upstream: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, flags in (("open", {}), ("enforce", {"allow": ALLOW})):
        vmnet = net("attach", f"l{name}", f"lv{name}", **flags)
        vm = the_lab.fake_vm("h", f"l{name[0]}", vmnet["bridge"], vmnet["ip"], vmnet["gateway"])
        gw = vmnet["gateway"]
        if name == "open":
            out["direct to the upstream server"] = lookups(vm, upstream, "d{i}.bench.test.lan", n)
        out[f"{name}: forwarder, first lookup of a name"] = lookups(
            vm, gw, f"{name}{{i}}.bench.test.lan", n
        )
        lookups(vm, gw, "same.bench.test.lan", 1)
        out[f"{name}: forwarder, cached"] = lookups(vm, gw, "same.bench.test.lan", n)
        net("detach", f"lv{name}")
    return out


def report(results: dict[str, Any]) -> None:
    rows = []
    base = median(results["apply_ms"]["deny (no DNS, no list)"])
    for mode, xs in results["apply_ms"].items():
        rows.append([mode, f"{median(xs):.0f}", f"{pct(xs, 0.9):.0f}", f"{median(xs) - base:+.0f}"])
    print_table(
        f"New ENV's first attach ({results['envs']} ENVs each), ms",
        ["mode", "median", "p90", "vs deny"],
        rows,
    )
    rows = []
    direct = median(results["lookup_ms"]["direct to the upstream server"])
    for what, xs in results["lookup_ms"].items():
        m = median(xs)
        rows.append([what, f"{m:.2f}", f"{pct(xs, 0.9):.2f}", f"{m - direct:+.2f}", f"{xs[0]:.2f}"])
    print_table(
        f"DNS lookups from an ENV ({results['runs']} each), ms",
        ["path", "median", "p90", "vs direct", "very first"],
        rows,
    )


if __name__ == "__main__":
    main()
