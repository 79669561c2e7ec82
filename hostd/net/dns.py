"""The ENVs' DNS forwarders: one dnsmasq per ENV that may go out, on the ENV's gateway address.

Each forwarder is written to hostd's state (ENV, configuration file) before it starts, runs in a
session of its own (a Ctrl-C of hostd does not reach it; `--keep-vms` keeps it serving) and is
found again after a restart by its configuration path on its command line: a restarted hostd
keeps a forwarder whose configuration is unchanged and reaps every other one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from hostd.builders.egress_plan import (
    EgressPlan,
    answers_from_log,
    dnsmasq_conf,
    parse_upstreams,
)
from ttci.infra.db import Store, now
from ttci.infra.proc import need, spawn, stop
from ttci.model.errors import TTError

__all__ = ["START_TIMEOUT_S", "DnsError", "Forwarders", "find_processes", "upstreams"]

log = logging.getLogger("hostd.net.dns")
START_TIMEOUT_S = 10.0


class DnsError(TTError):
    """An ENV's DNS forwarder did not start."""


def upstreams(setting: str, resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """`--dns`: "host" (the nameservers of this host's resolv.conf, IPv4), "none", or a list
    of ADDR[:PORT] -> the forwarders' servers in dnsmasq's form. Raises ValueError."""
    text = setting.strip().lower()
    if text == "none":
        return ()
    if text != "host":
        return parse_upstreams(text)
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        lines = []
    found: list[str] = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found += parse_upstreams(words[1])
    if not found:
        log.warning("no IPv4 nameserver in %s: guests get no DNS (see --dns)", resolv_conf)
    return tuple(found)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return []
    return [] if state in ("Z", "X") else raw.decode(errors="replace").split("\0")


def find_processes(conf_dir: Path) -> dict[int, Path]:
    """Live dnsmasq processes started with a configuration under conf_dir: pid -> its file."""
    marker = f"--conf-file={conf_dir}/"
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            for arg in _cmdline(int(d.name)):
                if arg.startswith(marker):
                    found[int(d.name)] = Path(arg.removeprefix("--conf-file="))
    return found


def _gone(pid: int, conf: Path) -> bool:
    return f"--conf-file={conf}" not in _cmdline(pid)


class Forwarders:
    """The forwarders of one hostd, their files under conf_dir."""

    def __init__(self, store: Store, conf_dir: Path) -> None:
        self.store = store
        self.dir = conf_dir
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._answers: dict[str, tuple[int, dict[str, set[str]]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def migrations() -> list[tuple[str, Any]]:
        def forwarders(db: sqlite_utils.Database) -> None:
            db.table("dns_forwarders").create(
                {"env": str, "bridge": str, "conf": str, "pid": int, "started_at": str}, pk="env"
            )

        return [("0004_dns_forwarders", forwarders)]

    def paths(self, bridge: str) -> tuple[Path, Path, Path]:
        """(configuration, pid file, log) of the forwarder on bridge."""
        return (
            self.dir / f"{bridge}.conf",
            self.dir / f"{bridge}.pid",
            self.dir / f"{bridge}.log",
        )

    def _row(self, env: str) -> dict[str, Any] | None:
        with self.store.lock:
            rows = list(self.store.db.table("dns_forwarders").rows_where("env = ?", [env]))
        return rows[0] if rows else None

    def rows(self) -> list[dict[str, Any]]:
        with self.store.lock:
            return list(self.store.db.table("dns_forwarders").rows)

    def ensure(self, plan: EgressPlan) -> bool:
        """The ENV's forwarder running with plan's configuration; True when (re)started.

        Raises:
            DnsError: dnsmasq is missing or did not come up (its log says why).
        """
        conf, pid_file, log_file = self.paths(plan.bridge)
        text = dnsmasq_conf(plan, str(pid_file), str(log_file))
        with self._lock:
            row = self._row(plan.env)
            if row and row["pid"] and not _gone(row["pid"], conf) and _same(conf, text):
                return False
            if row:
                self._stop(row)
            with self.store.lock:
                self.store.db.table("dns_forwarders").insert(
                    {"env": plan.env, "bridge": plan.bridge, "conf": str(conf), "pid": 0,
                     "started_at": now()},
                    replace=True,
                )  # fmt: skip
            self.dir.mkdir(parents=True, exist_ok=True)
            pid_file.unlink(missing_ok=True)
            conf.write_text(text)
            pid = self._start(plan.env, conf, pid_file, log_file)
            with self.store.lock:
                self.store.db.table("dns_forwarders").update(plan.env, {"pid": pid})
        return True

    def _start(self, env: str, conf: Path, pid_file: Path, log_file: Path) -> int:
        argv = [need("dnsmasq"), "--keep-in-foreground", f"--conf-file={conf}"]
        child = spawn(argv, log_path=log_file, new_session=True)
        self._children[env] = child
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if child.poll() is not None:
                break
            if pid_file.exists() and pid_file.read_text().strip():  # written once it listens
                return child.pid
            time.sleep(0.005)
        stop(child, grace=1)
        self._children.pop(env, None)
        tail = log_file.read_text(errors="replace")[-800:] if log_file.exists() else ""
        raise DnsError(
            f"the DNS forwarder of ENV {env} did not start: {tail.strip() or 'no output'}",
            hint="is another DNS server bound to port 53 on all addresses of this host?",
        )

    def stop(self, env: str) -> None:
        """Stop the ENV's forwarder and forget it; idempotent."""
        with self._lock:
            row = self._row(env)
            if row:
                self._stop(row)
            self._answers.pop(env, None)

    def _stop(self, row: dict[str, Any]) -> None:
        conf = Path(row["conf"])
        child = self._children.pop(row["env"], None)
        if child is not None:
            stop(child, grace=2)
        elif row["pid"] and not _gone(row["pid"], conf):
            _kill(row["pid"], conf)  # a forwarder of an earlier hostd: not our child
        for p in (conf, *self.paths(row["bridge"])[1:]):
            p.unlink(missing_ok=True)
        with self.store.lock:
            self.store.db.table("dns_forwarders").delete_where("env = ?", [row["env"]])

    def reconcile(self, wanted: dict[str, EgressPlan]) -> dict[str, int]:
        """Keep or restart the forwarders of wanted ENVs; stop every other one, also those
        no row knows (started just before a crash)."""
        counts = {"dns_kept": 0, "dns_started": 0, "dns_reaped": 0}
        known = {Path(r["conf"]): r["pid"] for r in self.rows()}
        for pid, conf in find_processes(self.dir).items():  # first: they may hold port 53
            if known.get(conf) != pid:
                log.warning("reaping a DNS forwarder no state row owns: pid %d (%s)", pid, conf)
                _kill(pid, conf)
                counts["dns_reaped"] += 1
        for row in self.rows():
            if row["env"] not in wanted:
                self.stop(row["env"])
                counts["dns_reaped"] += 1
        for plan in wanted.values():
            counts["dns_started" if self.ensure(plan) else "dns_kept"] += 1
        return counts

    def stop_all(self) -> None:
        for row in self.rows():
            self.stop(row["env"])
        for pid, conf in find_processes(self.dir).items():
            _kill(pid, conf)

    def answers(self, env: str, bridge: str) -> dict[str, set[str]]:
        """address -> names the ENV's forwarder answered with it (from its query log)."""
        log_file = self.paths(bridge)[2]
        with self._lock:
            offset, names = self._answers.get(env, (0, {}))
            try:
                with log_file.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                return names
            cut = data.rfind(b"\n") + 1
            answers_from_log(data[:cut].decode(errors="replace"), names)
            self._answers[env] = (offset + cut, names)
            return names


def _same(conf: Path, text: str) -> bool:
    try:
        return conf.read_text() == text
    except OSError:
        return False


def _kill(pid: int, conf: Path) -> None:
    """Stop a forwarder that is not our child (we cannot wait for it): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _gone(pid, conf):
                return
            time.sleep(0.02)
    log.warning("DNS forwarder pid %d did not stop", pid)
