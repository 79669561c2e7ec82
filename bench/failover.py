"""Client failover benchmark: how long a client with a dead replica first in its list takes to
get its answer from the live one.

    python bench/failover.py [--runs 20] [--json out.json]

One real tt-scheduler (SQLite) on loopback. In the same run, each against its baseline (the
same request with only the live URL): tt's Client (`GET /v1/status`) and the stdlib run stream
(`POST /v1/envs/NAME/run`, answered 404) with a refused first URL, not yet remembered; the
same once the live URL is remembered (sticky); a first URL that never accepts (a machine that
is off: the 3 s connect timeout); and `tt status` as a fresh process (the GitLab driver's case)
before and after the cache file remembers the live URL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# The repository instead of bench/ itself: bench/queue.py would shadow the standard library's.
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, median, print_table, write_json
from ttci.cli.allinone import STOP_GRACE_S, _spawn, python_main
from ttci.client.config import ClientConfig
from ttci.client.exec_stream import exec_events
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging
from ttci.infra.proc import BASE_ENV, stop
from ttci.model.errors import ApiError
from ttci.wire.commands import ExecRequest

ADMIN = "bench-admin-token-0123456789"
BIN = Path(sys.executable).parent


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        fn()
        out.append(time.monotonic() - t0)
    return out


@contextlib.contextmanager
def scheduler(state: Path) -> Iterator[str]:
    addr = f"127.0.0.1:{free_port()}"
    argv = [*python_main("ttci.scheduler.web.serve"), "--listen", addr, "--state-dir", str(state)]
    proc = _spawn(
        argv,
        {**BASE_ENV, "TT_ADMIN_TOKEN": ADMIN, "TT_JOIN_TOKEN": ADMIN + "-join"},
        state / "s.log",
        "tt-scheduler",
    )
    try:
        yield addr
    finally:
        stop(proc, grace=STOP_GRACE_S)


@contextlib.contextmanager
def never_accepts() -> Iterator[str]:
    """A port whose accept queue is full: the kernel drops new SYNs, as for a machine that is
    off (the client waits for its connect timeout)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hung.getsockname())
        fillers.append(f)
    time.sleep(0.2)
    try:
        yield f"127.0.0.1:{hung.getsockname()[1]}"
    finally:
        for f in fillers:
            f.close()
        hung.close()


def _run_404(server: str) -> None:
    with contextlib.suppress(ApiError):
        list(exec_events(ClientConfig(server, ADMIN), "no-such-env", ExecRequest(("true",))))


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"  # a new port each time: a list not yet remembered


def in_process(live: str, runs: int) -> list[tuple[str, list[float], str]]:
    remembered = f"{_dead()},{live}"
    Client(ClientConfig(remembered, ADMIN)).status()  # now the live one goes first
    out = [
        ("status: live URL only", timed(lambda: Client(ClientConfig(live, ADMIN)).status(), runs)),
    ]
    out.append(
        (
            "status: refused first",
            timed(lambda: Client(ClientConfig(f"{_dead()},{live}", ADMIN)).status(), runs),
        )
    )
    out.append(
        (
            "status: refused first, remembered",
            timed(lambda: Client(ClientConfig(remembered, ADMIN)).status(), runs),
        )
    )

    def off_first() -> None:
        with never_accepts() as off:  # a new one each time: a list not yet remembered
            Client(ClientConfig(f"{off},{live}", ADMIN)).status()

    out.append(("status: off first (connect timeout)", timed(off_first, 2)))
    out.append(("run: live URL only", timed(lambda: _run_404(live), runs)))
    out.append(("run: refused first", timed(lambda: _run_404(f"{_dead()},{live}"), runs)))
    return [(name, xs, name.split(":")[0]) for name, xs in out]  # grouped by their baseline


def fresh_process(live: str, runs: int, cache: Path) -> list[tuple[str, list[float], str]]:
    """`tt status` as a new process each time, the three cases interleaved (the machine's
    load hits them alike): the live URL alone; a refused URL first with an empty cache (a
    new cache directory each time); the same list once the cache file names the live URL."""
    listed = f"{_dead()},{live}"

    def tt_status(server: str, cache_dir: Path) -> float:
        env = {**os.environ, "TT_TOKEN": ADMIN, "TT_SERVER": server, "TT_CONFIG": "/none"}
        t0 = time.monotonic()
        subprocess.run(
            [BIN / "tt", "status", "--json"],
            env={**env, "XDG_CACHE_HOME": str(cache_dir)},
            check=True,
            capture_output=True,
        )
        return time.monotonic() - t0

    tt_status(listed, cache / "warm")  # the cache file now names the live URL
    alone, first, cached = [], [], []
    for i in range(runs):
        alone.append(tt_status(live, cache / "alone"))
        first.append(tt_status(listed, cache / f"new-{i}"))
        cached.append(tt_status(listed, cache / "warm"))
    return [
        ("tt status: live URL only", alone, "process"),
        ("tt status: refused first, no cache file", first, "process"),
        ("tt status: refused first, cache file", cached, "process"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="requests per row (median)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp, scheduler(Path(tmp)) as live:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        rows = in_process(live, args.runs)
        rows += fresh_process(live, max(5, args.runs // 2), Path(tmp) / "pcache")
    baseline = {
        "status": median(rows[0][1]),
        "run": median(rows[4][1]),
        "process": median(rows[6][1]),
    }
    table, data = [], []
    for name, xs, group in rows:
        m = median(xs)
        extra = m - baseline[group]
        table.append(
            [name, f"{m * 1000:.1f}", f"{extra * 1000:+.1f}", f"{m / baseline[group]:.2f}x"]
        )
        data.append({"case": name, "median_s": m, "extra_s": extra, "runs": len(xs)})
    print_table(
        "client failover: time to the answer (median)",
        ["case", "ms", "vs live only (ms)", "ratio"],
        table,
    )
    write_json(args.json, {"rows": data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
