"""hostd's network manager driven in a lab namespace, one operation per process, as a stand-in
for hostd without VMs: `nsenter --net=/run/netns/NS python -m tests.lab_hostnet STATE --dns UP
OP ...` prints the result as JSON. Each call builds a fresh NetManager from the state directory,
so every call is also what a restarted hostd does (forwarders are found again, not children).

OPs: attach ENV VM [--deny] [--allow RULES] [--audit] | detach VM | info ENV | counts |
reconcile VM,... | teardown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from hostd.net.manager import NetConfig, NetManager
from ttci.infra.db import Store
from ttci.model.egress import parse_egress


def manager(state: Path, dns: str, default: str) -> NetManager:
    cfg = NetConfig(
        pool="10.213.0.0/16",
        dns=tuple(x for x in dns.split(",") if x),
        egress_default=parse_egress(default),
    )
    return NetManager(Store(state / "hostd.db", NetManager.migrations()), state, cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state", type=Path)
    ap.add_argument("--dns", default="")
    ap.add_argument("--default", default="")
    ap.add_argument("op")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--deny", action="store_true")
    ap.add_argument("--allow", default="")
    ap.add_argument("--audit", action="store_true")
    a = ap.parse_args()
    net = manager(a.state, a.dns, a.default)
    t0 = time.monotonic()
    out: object
    if a.op == "attach":
        env, vm = a.args
        vmnet = net.attach(
            vm, env, a.deny, [], allow_egress=parse_egress(a.allow), egress_audit=a.audit
        )
        out = {**dataclasses.asdict(vmnet), "kernel_arg": vmnet.kernel_arg}
        out["bridge"] = net.bridge_for(env)
    elif a.op == "detach":
        net.detach(a.args[0])
        out = {}
    elif a.op == "info":
        out = net.egress_info(a.args[0])
    elif a.op == "counts":
        out = {k: list(v) for k, v in net.egress_counts().items()}
    elif a.op == "reconcile":
        out = net.reconcile(set(a.args[0].split(",")) if a.args else set())
    elif a.op == "teardown":
        net.teardown()
        out = {}
    else:
        raise SystemExit(f"unknown op {a.op}")
    print(json.dumps({"result": out, "seconds": time.monotonic() - t0}))


if __name__ == "__main__":
    main()
