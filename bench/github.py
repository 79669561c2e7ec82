"""GitHub webhooks benchmark: the answer time under 50 concurrent deliveries, and queued ->
runner command started in a fresh VM, with the guest's own boot shown apart.

    python bench/github.py [--deliveries 500] [--concurrency 1,10,50] [--runs 3] [--json out.json]

Both parts run the real `tt-github-webhooks serve` (waitress) as a subprocess, against the
loopback GitHub built from GitHub's OpenAPI description (tests/github/standin.py), with GitHub's
own workflow_job payloads signed as GitHub signs them.
1. Answer time: `--deliveries` queued deliveries for distinct jobs from `--concurrency` clients
   at once; the pool limit is 0, so jobs are recorded and wait (no VM is booted): this is the
   request path alone (verify, parse, dedupe, SQLite write). Target: p99 <= 100 ms.
2. Queued -> runner started: `tt up`'s stack with one amd64 host; per run, one queued delivery,
   then the time until the launcher starts run.sh in the VM (the stand-in run.sh is pushed in
   with --push-runner), split into the guest's boot (kernel to agent, as hostd measures it) and
   everything else (webhook, JIT config, API, placement, overlay, libvirt, push, launch).
   Target: overhead <= 1 s beyond the boot. Then `completed` -> the VM is gone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, print_table, write_json
from hostd.builders.image_recipe import BuildSpec
from hostd.images.build import build_image
from tests.github.payloads import deliver, headers, job_event
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys, serve_argv
from ttci.cli import allinone
from ttci.client.config import ClientConfig
from ttci.client.scheduler import ApiError, Client
from ttci.infra.log import setup_logging
from ttci.infra.proc import stop
from ttci.model.naming import parse_arch, parse_release

SECRET = "bench-webhook-secret"  # noqa: S105 - a throw-away secret for a loopback run
REPO = "octo-org/bench"
LABELS = ["self-hosted", "tt", "debian-12", "amd64"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


@contextmanager
def service(tmp: Path, gh: StandIn, extra: list[str], env: dict[str, str]) -> Iterator[str]:
    key = tmp / "app.pem"
    key.write_text(app_keys()[0])
    port = free_port()
    log = (tmp / "webhooks.log").open("wb")
    proc = subprocess.Popen(
        serve_argv(tmp / "gh", gh.url, key, port, *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "TT_GH_WEBHOOK_SECRET": SECRET},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start; see {tmp / 'webhooks.log'}")
            time.sleep(0.1)
        yield url
    finally:
        stop(proc, grace=30)
        log.close()


def answer_times(gh: StandIn, n: int, concurrency: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="tt-bench-gh-") as d,
        service(
            Path(d),
            gh,
            ["--max-waiting", "0", "--reconcile-interval", "3600"],
            {"TT_SERVER": "127.0.0.1:9", "TT_TOKEN": "unused"},
        ) as url,
    ):
        # Bodies signed beforehand, sent with http.client, one connection per delivery as
        # GitHub does: the client's own CPU (the 2 cores are shared) stays out of the numbers.
        port = int(url.rsplit(":", 1)[1])
        reqs = []
        for i in range(n):
            ev = job_event("queued", 5_000_000 + i, LABELS, repo=REPO)
            raw = json.dumps(ev, separators=(",", ":")).encode()
            reqs.append((raw, headers("workflow_job", raw, SECRET.encode())))
        deliver(
            url + "/webhook", job_event("queued", 4_999_999, LABELS, repo=REPO), SECRET.encode()
        )  # warm-up

        def one(req: tuple[bytes, dict[str, str]]) -> tuple[float, int]:
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/webhook", body=req[0], headers=req[1])
                resp = conn.getresponse()
                resp.read()
            finally:
                conn.close()
            return time.perf_counter() - t0, resp.status

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, reqs))
        wall = time.perf_counter() - t0
    times = [t * 1000 for t, _ in results]
    return {
        "deliveries": n,
        "concurrency": concurrency,
        "wall_s": wall,
        "p50_ms": statistics.median(times),
        "p99_ms": pct(times, 99),
        "max_ms": max(times),
        "statuses": dict(Counter(str(s) for _, s in results)),
    }


def queued_to_runner(gh: StandIn, runs: int, image_path: Path) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="tt-bench-gh-vm-") as d:
        tmp = Path(d)
        runner = tmp / "runner"
        runner.mkdir()
        (runner / "run.sh").write_bytes(RUN_SH.read_bytes())
        (runner / "run.sh").chmod(0o755)
        with allinone.running(
            tmp / "cloud",
            image_path,
            scheduler_listen=f"127.0.0.1:{free_port()}",
            hostd_listen=f"127.0.0.1:{free_port()}",
            cpu_total=4,
            mem_total=4096,
        ) as stack:
            tt = Client(ClientConfig(stack.scheduler, stack.token))
            env = {"TT_SERVER": stack.scheduler, "TT_TOKEN": stack.token}
            with service(
                tmp,
                gh,
                ["--push-runner", str(runner), "--mem", "384", "--reconcile-interval", "3600"],
                env,
            ) as url:
                for i in range(runs):
                    jid = 6_000_000 + i
                    gh.add_job(REPO, jid, LABELS, "queued")
                    t0 = time.time()
                    r = deliver(
                        url + "/webhook",
                        job_event("queued", jid, LABELS, repo=REPO),
                        SECRET.encode(),
                    )
                    answered = time.time() - t0
                    job = wait_job(url, jid, lambda j: bool(j["runner_started_at"]))
                    total = job["runner_started_at"] - t0
                    boot = float(job["guest_boot_s"] or 0)
                    gh.jobs[jid]["status"] = "completed"
                    t1 = time.time()
                    deliver(
                        url + "/webhook",
                        job_event(
                            "completed", jid, LABELS, repo=REPO, runner_name=job["runner_name"]
                        ),
                        SECRET.encode(),
                    )
                    wait_job(url, jid, lambda j: j["state"] == "done")
                    gone = time.time() - t1
                    try:
                        tt.show_env(job["env"])
                        raise RuntimeError(f"ENV {job['env']} still exists")
                    except ApiError:
                        pass
                    out.append(
                        {
                            "run": i + 1,
                            "answer_s": answered,
                            "total_s": total,
                            "vm_ready_s": job["vm_ready_at"] - t0,
                            "guest_boot_s": boot,
                            "overhead_s": total - boot,
                            "cloud_s": job["vm_ready_at"] - t0 - boot,
                            "launch_s": job["runner_started_at"] - job["vm_ready_at"],
                            "status": r.status_code,
                            "completed_to_vm_gone_s": gone,
                        }
                    )
            tt.session.close()
    return out


def wait_job(url: str, jid: int, cond: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in requests.get(url + "/jobs", timeout=5).json()}
        if jid in jobs and cond(jobs[jid]):
            return jobs[jid]
        time.sleep(0.05)
    raise TimeoutError(f"job {jid} did not get there in {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deliveries", type=int, default=500, help="deliveries in part 1")
    p.add_argument(
        "--concurrency", default="1,10,50", help="deliveries at once in part 1 (comma list)"
    )
    p.add_argument("--runs", type=int, default=3, help="queued -> runner runs in part 2 (0: skip)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    args = p.parse_args()
    setup_logging()
    _, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    try:
        answers = [answer_times(gh, args.deliveries, int(c)) for c in args.concurrency.split(",")]
        print_table(
            "Webhook answer time (real service, waitress, SQLite)",
            ["deliveries", "at once", "p50 ms", "p99 ms", "max ms", "statuses", "per s"],
            [
                [
                    str(a["deliveries"]),
                    str(a["concurrency"]),
                    f"{a['p50_ms']:.1f}",
                    f"{a['p99_ms']:.1f}",
                    f"{a['max_ms']:.1f}",
                    str(a["statuses"]),
                    f"{a['deliveries'] / a['wall_s']:.0f}",
                ]
                for a in answers
            ],
        )
        runs: list[dict[str, Any]] = []
        if args.runs:
            build_image(
                BuildSpec(parse_release("debian-12"), parse_arch("amd64")),
                args.image_path,
                args.cache_dir,
            )
            runs = queued_to_runner(gh, args.runs, args.image_path)
            print_table(
                "queued -> run.sh started in a fresh debian-12 amd64 VM (384 MiB, TCG)",
                [
                    "run",
                    "202 in s",
                    "VM ready s",
                    "runner started s",
                    "guest boot s",
                    "overhead s",
                    "of it: webhook+ENV s",
                    "of it: push+start s",
                    "completed -> VM gone s",
                ],
                [
                    [
                        str(r["run"]),
                        f"{r['answer_s']:.3f}",
                        f"{r['vm_ready_s']:.2f}",
                        f"{r['total_s']:.2f}",
                        f"{r['guest_boot_s']:.2f}",
                        f"{r['overhead_s']:.2f}",
                        f"{r['cloud_s']:.2f}",
                        f"{r['launch_s']:.2f}",
                        f"{r['completed_to_vm_gone_s']:.2f}",
                    ]
                    for r in runs
                ],
            )
        if args.json:
            write_json(args.json, {"answer_times": answers, "queued_to_runner": runs})
    finally:
        gh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
