"""Admin page and /metrics with many VMs: response time over HTTP, and the browser's render.

    python bench/admin.py [--vms 1000,5000] [--per-env 1] [--runs 20] [--no-browser] [--json out]

No VM is booted: fake hosts register through the scheduler's own registration and ENV, VM and
job-history rows go straight into a real scheduler state database (tests/admin_fake.py). The
scheduler's real app is served by waitress on loopback, as tt-scheduler serves it; requests come
from a logged-in admin session. With Chromium (Debian's) present, it also times the page from
navigation to every VM row drawn, and one live update. Target: <= 300 ms each at 1,000 VMs.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import waitress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, print_table, write_json
from tests.admin_fake import fake_scheduler
from ttci.scheduler.web.api import create_app

ADMIN = "bench-admin-token-" + "b" * 20
TARGET_MS = 300.0


def _login(base: str) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{base}/admin/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf, "no CSRF token on the login page"
    r = s.post(f"{base}/admin/login", data={"token": ADMIN, "csrf_token": csrf[1]}, timeout=30)
    r.raise_for_status()
    return s


def _time(session: requests.Session, url: str, runs: int) -> dict[str, float]:
    times, size = [], 0
    session.get(url, timeout=60).raise_for_status()  # warm up
    for _ in range(runs):
        t0 = time.perf_counter()
        r = session.get(url, timeout=60)
        r.raise_for_status()
        size = len(r.content)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
        "bytes": size,
    }


def _browser(base: str) -> dict[str, float]:
    """Navigation to the first screen of ENVs drawn; then every VM drawn (Show more until the
    end); then one full redraw of everything drawn."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{base}/admin/login")
        page.fill("#token", ADMIN)
        page.click("#login")
        page.wait_for_selector("#hosts tr[data-host]")
        t0 = time.perf_counter()
        page.reload()
        page.wait_for_selector("#envs .env", timeout=60_000)
        page.evaluate("() => document.body.getBoundingClientRect()")
        first = (time.perf_counter() - t0) * 1000
        # From navigation start to the end of the first draw, as the page itself measures it.
        marked = page.evaluate("() => performance.getEntriesByName('tt-first-draw')[0].startTime")
        data = page.evaluate("() => performance.getEntriesByName('tt-first-data')[0].startTime")
        all_rows = page.evaluate(
            """async () => {
                const more = document.getElementById('env-more'), t0 = performance.now();
                while (!more.hidden) {
                    more.querySelector('button').click();
                    document.body.getBoundingClientRect();
                    await new Promise(r => setTimeout(r, 0));
                }
                return performance.now() - t0;
            }"""
        )
        redraw = page.evaluate(
            """() => {
                const t0 = performance.now();
                for (const tb of document.querySelectorAll('#envs .blk')) {
                    const h = tb.innerHTML; tb.innerHTML = ''; tb.innerHTML = h;
                }
                document.body.getBoundingClientRect();
                return performance.now() - t0;
            }"""
        )
        rows = page.evaluate("() => document.querySelectorAll('#envs .vm[data-vm]').length")
        b.close()
    return {
        "first": first,
        "marked": float(marked),
        "data": float(data),
        "all": float(all_rows),
        "redraw": float(redraw),
        "rows": rows,
    }


def measure(vms: int, per_env: int, runs: int, browser: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tt-bench-admin-") as tmp:
        sched = fake_scheduler(Path(tmp), ADMIN, vms, per_env=per_env, hosts=8, jobs=500)
        port = free_port()
        server = waitress.create_server(create_app(sched), host="127.0.0.1", port=port, threads=8)
        threading.Thread(target=server.run, daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        try:
            session = _login(base)
            out = []
            for name, path in (
                ("admin page (HTML)", "/admin/"),
                ("admin state (JSON)", "/admin/api/state"),
                ("scheduler /metrics", "/metrics"),
            ):
                out.append({"what": name, "vms": vms, **_time(session, base + path, runs)})
            if browser and Path("/usr/bin/chromium").exists():
                r = _browser(base)
                for key, what in (
                    ("first", "browser: reload to first screen drawn"),
                    ("data", "browser: navigation start to state parsed (in page)"),
                    ("marked", "browser: navigation start to first draw (in page)"),
                    ("all", f"browser: draw the rest ({r['rows']} VM rows)"),
                    ("redraw", "browser: redraw every drawn row"),
                ):
                    out.append({"what": what, "vms": vms, "median_ms": r[key], "once": True})
            return out
        finally:
            server.close()
            sched.stop()


def _verdict(r: dict[str, Any]) -> str:
    """The target applies at 1,000 VMs to the HTTP answers and the page's own first draw (not
    to Playwright's reload round trips, nor to drawing more than the first screen)."""
    if r["vms"] > 1000 or (r.get("once") and "first draw (in page)" not in r["what"]):
        return ""
    return "ok" if r["median_ms"] <= TARGET_MS else "MISSED"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", default="1000", help="VM counts to measure, comma separated")
    p.add_argument("--per-env", type=int, default=1, help="VMs per ENV (1: most rows)")
    p.add_argument("--runs", type=int, default=20, help="requests per endpoint")
    p.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the fake hosts do not answer; that is expected
    results: list[dict[str, Any]] = []
    for n in (int(x) for x in args.vms.split(",")):
        results += measure(n, args.per_env, args.runs, not args.no_browser)
    print_table(
        f"admin page and /metrics (target <= {TARGET_MS:.0f} ms at 1,000 VMs; {args.runs} runs)",
        ["what", "VMs", "median", "p95", "size", "target"],
        [
            [
                r["what"],
                str(r["vms"]),
                f"{r['median_ms']:.1f} ms",
                f"{r['p95_ms']:.1f} ms" if "p95_ms" in r else "",
                f"{r['bytes'] / 1024:.0f} KiB" if "bytes" in r else "",
                _verdict(r),
            ]
            for r in results
        ],
    )
    write_json(args.json, {"per_env": args.per_env, "runs": args.runs, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
