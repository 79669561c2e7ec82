"""Admission-queue benchmark: a burst of 3x capacity on the all-in-one cloud, with real VMs.

    python bench/queue.py [--big 10] [--small 2] [--cpu-total 4] [--json out.json]

Runs `tt up`'s stack (scheduler + hostd + private libvirtd) with room for --cpu-total 1-CPU VMs,
then two projects submit their jobs at once: the big one (GitLab, --big jobs) first, the small
one (GitHub, --small jobs) right behind it, the worst case for first-come-first-served. Each job
is what a CI job does: create a 1-VM ENV (waiting in the queue), run a command of 1-3 s in it,
delete it. The issue's burst is 20 + 4 jobs on room for 8; the defaults are scaled down for a
2-core machine (12 jobs on room for 4, still 3x capacity).

Measured:
- failures (goal 0), and in the same run the fail-fast baseline: the same burst with
  `wait: false` (what every client got before the queue) fails all but capacity;
- capacity freed -> next VM creation started: from a DELETE of a finished job answering to the
  `granted` event of the next waiting job (p50/p95; goal p50 <= 0.3 s). A grant that arrives
  before the DELETE has answered counts as 0 (the scheduler wakes its dispatcher before it
  answers);
- each job's wait in the queue (the scheduler's own `waited_s`) and the positions it was told;
- fairness: the rank at which each project's jobs were granted. With FIFO the small project's
  jobs would go last (ranks big+1 .. big+small); fair share lets them in at the first free slots.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's queue (which concurrent.futures
# imports): put the repository, not this folder, first on the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import free_port, print_table, write_json
from hostd.builders.image_recipe import BuildSpec
from hostd.images.build import build_image
from ttci.cli import allinone
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging
from ttci.model.errors import TTError
from ttci.model.naming import parse_release, parse_target
from ttci.wire.commands import EventKind, ExecRequest
from ttci.wire.envs import EnvRequest, VmUp
from ttci.wire.queue import QueueInfo, WaitOptions

PROJECTS = {"big": ("gitlab", "group/big"), "small": ("github", "org/small")}
GOAL_P50_S = 0.3


@dataclass
class Job:
    name: str
    project: str  # big or small
    seq: int  # submission order
    run_s: int  # how long its command runs
    submitted: float = 0.0  # monotonic seconds from the burst's start
    granted: float | None = None
    ready: float | None = None
    delete_sent: float | None = None
    deleted: float | None = None
    waited_s: float = 0.0  # the scheduler's count
    positions: list[int] = field(default_factory=list)
    rank: int = 0  # 1 = granted first
    error: str = ""


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _burst(big: int, small: int) -> list[Job]:
    """The big project's jobs first, then the small one's; commands of 1, 2, 3 s in turn."""
    jobs = [Job(f"big-{i:02d}", "big", i, 1 + i % 3) for i in range(big)]
    return jobs + [Job(f"small-{i:02d}", "small", big + i, 1 + i % 3) for i in range(small)]


def _request(job: Job, image: str, memory: int) -> EnvRequest:
    kind, project = PROJECTS[job.project]
    origin = {"kind": kind, "project": project, "job": str(job.seq)}
    return EnvRequest(job.name, image, memory_mib=memory, life_s=1800, origin=origin)


def _run_job(
    cfg: ClientConfig, job: Job, req: EnvRequest, t0: float, start: threading.Event
) -> None:
    """One CI job: wait in the queue, boot, run the command, delete. Never raises."""
    client = Client(cfg)

    def now() -> float:
        return time.monotonic() - t0

    def queued(q: QueueInfo) -> None:
        job.positions.append(q.position)

    def granted(waited: float) -> None:
        job.granted, job.waited_s = now(), waited

    def vm_up(vm: VmUp) -> None:
        # No granted event: granted at once (before the stream attached), or so soon after a
        # queued event that the first VM up is the best we know.
        if job.granted is None:
            job.granted = now() if job.positions else job.submitted

    start.wait()
    time.sleep(0.03 * job.seq)  # a burst, but in a known order
    job.submitted = now()
    try:
        client.create_env_progress(req, vm_up, on_queued=queued, on_granted=granted)
        job.ready = now()
        if job.granted is None:
            job.granted = job.ready if job.positions else job.submitted
        code = None
        for ev in client.exec(job.name, ExecRequest.shell(f"sleep {job.run_s}; echo done")):
            if ev.kind is EventKind.EXIT and ev.status is not None:
                code = ev.status.code
            elif ev.kind is EventKind.ERROR:
                job.error = ev.message
        if code != 0 and not job.error:
            job.error = f"the job's command exited with {code}"
        job.delete_sent = now()
        client.delete_env(job.name)
        job.deleted = now()
    except TTError as e:
        job.error = job.error or e.message
        client.delete_env_wait(job.name)


def queued_burst(cfg: ClientConfig, jobs: list[Job], image: str, memory: int) -> float:
    """Run every job at once; the burst's wall time."""
    t0, start = time.monotonic(), threading.Event()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(_run_job, cfg, j, _request(j, image, memory), t0, start) for j in jobs
        ]
        start.set()
        for f in futures:
            f.result()
    granted = sorted((j for j in jobs if j.granted is not None), key=lambda j: j.granted or 0)
    for rank, j in enumerate(granted, 1):
        j.rank = rank
    return time.monotonic() - t0


def fail_fast_burst(cfg: ClientConfig, jobs: list[Job], image: str, memory: int) -> dict[str, int]:
    """The baseline: the same burst with wait false. Returns how many started and how many
    were refused, by message (without the ENV's name). Everything made is deleted again."""

    def one(j: Job) -> str:
        client = Client(cfg)
        time.sleep(0.03 * j.seq)
        try:
            client.create_env(_request(j, image, memory), wait=WaitOptions(wait=False))
            return "started"
        except TTError as e:
            return e.message.replace(j.name, "NAME")[:200]
        finally:
            client.delete_env_wait(j.name)  # whatever exists of it (404 is fine)

    outcomes: dict[str, int] = {}
    with ThreadPoolExecutor(len(jobs)) as pool:
        for out in pool.map(one, jobs):
            outcomes[out] = outcomes.get(out, 0) + 1
    left = Client(cfg).get("/v1/envs")
    if left:
        raise SystemExit(f"the wait-false burst left ENVs behind: {[e['name'] for e in left]}")
    return outcomes


def freed_to_granted(jobs: list[Job]) -> list[float]:
    """Seconds from each DELETE answered while jobs waited to the next waiting job's grant
    (negative: the grant came before the answer). Each grant pays for one delete."""
    grants = sorted(j.granted for j in jobs if j.positions and j.granted is not None)
    deletes = sorted(
        (j.delete_sent, j.deleted)
        for j in jobs
        if j.delete_sent is not None and j.deleted is not None
    )
    out: list[float] = []
    for sent, answered in deletes:
        nxt = next((g for g in grants if g >= sent), None)
        if nxt is None:
            break  # nobody waited any more
        grants.remove(nxt)
        out.append(nxt - answered)
    return out


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summary(jobs: list[Job], wall: float, baseline: dict[str, int] | None) -> dict[str, Any]:
    signed = freed_to_granted(jobs)
    lat = [max(0.0, x) for x in signed]
    projects: dict[str, dict[str, Any]] = {}
    for p in PROJECTS:
        mine = [j for j in jobs if j.project == p]
        projects[p] = {
            "jobs": len(mine),
            "ranks": [j.rank for j in mine],
            "mean_rank": _mean([float(j.rank) for j in mine]),
            "mean_wait_s": _mean([j.waited_s for j in mine]),
            "max_wait_s": max((j.waited_s for j in mine), default=0.0),
        }
    n_big = int(projects["big"]["jobs"])
    small_ranks: list[int] = projects["small"]["ranks"]
    return {
        "jobs": len(jobs),
        "failed": sum(1 for j in jobs if j.error),
        "baseline_wait_false_failed": None
        if baseline is None
        else sum(n for k, n in baseline.items() if k != "started"),
        "baseline_wait_false_outcomes": baseline,
        "wall_s": wall,
        "freed_to_granted_s": lat,
        "freed_to_granted_signed_s": signed,
        "freed_to_granted_p50_s": _percentile(lat, 0.5),
        "freed_to_granted_p95_s": _percentile(lat, 0.95),
        "projects": projects,
        # The small project's jobs must not all wait behind the big one's.
        "small_not_last": bool(small_ranks) and min(small_ranks) <= n_big,
        "fifo_small_ranks": list(range(n_big + 1, n_big + len(small_ranks) + 1)),
    }


def print_report(jobs: list[Job], s: dict[str, Any], cpu_total: float) -> None:
    rows = [
        [
            j.name,
            f"{j.submitted:.2f}",
            ",".join(map(str, dict.fromkeys(j.positions))) or "-",
            f"{j.waited_s:.1f} s",
            str(j.rank),
            f"{(j.ready or 0) - (j.granted or 0):.1f} s" if j.ready else "-",
            j.error[:60] or "ok",
        ]
        for j in sorted(jobs, key=lambda j: j.seq)
    ]
    print_table(
        f"each job (room for {cpu_total:g} VMs; the big project submits first)",
        ["job", "submitted at", "positions told", "waited", "granted #", "boot", "result"],
        rows,
    )
    if s["baseline_wait_false_outcomes"]:
        print_table(
            "baseline: the same burst with wait: false (fail fast)",
            ["outcome", "jobs"],
            [[k, str(n)] for k, n in sorted(s["baseline_wait_false_outcomes"].items())],
        )
    p50, p95 = s["freed_to_granted_p50_s"], s["freed_to_granted_p95_s"]
    big, small = s["projects"]["big"], s["projects"]["small"]
    base = s["baseline_wait_false_failed"]
    print_table(
        "admission queue: a burst of 3x capacity",
        ["measure", "value", "goal"],
        [
            ["failures (queue)", f"{s['failed']} of {s['jobs']}", "0"],
            ["failures (wait: false, baseline)", "-" if base is None else f"{base}", "-"],
            ["capacity freed -> next grant, p50", f"{p50 * 1000:.0f} ms", "<= 300 ms"],
            ["capacity freed -> next grant, p95", f"{p95 * 1000:.0f} ms", "-"],
            ["samples (deletes while jobs waited)", str(len(s["freed_to_granted_s"])), "-"],
            ["big project: granted at", _ranks(big), "-"],
            ["small project: granted at", _ranks(small), "not last"],
            ["  (FIFO would grant small at)", ", ".join(map(str, s["fifo_small_ranks"])), ""],
            ["big project: mean / max wait", _waits(big), "-"],
            ["small project: mean / max wait", _waits(small), "-"],
            ["burst wall time", f"{s['wall_s']:.1f} s", "-"],
        ],
    )


def _ranks(p: dict[str, Any]) -> str:
    return f"{', '.join(map(str, sorted(p['ranks'])))} (mean {p['mean_rank']:.1f})"


def _waits(p: dict[str, Any]) -> str:
    return f"{p['mean_wait_s']:.1f} s / {p['max_wait_s']:.1f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=int, default=10, help="jobs of the big project")
    p.add_argument("--small", type=int, default=2, help="jobs of the small project")
    p.add_argument("--cpu-total", type=float, default=4, help="vCPUs the host hands out")
    p.add_argument("--mem-total", type=int, default=4096, help="MiB the host hands out")
    p.add_argument("--memory", type=int, default=384, help="MiB per VM")
    p.add_argument("--image", default="debian-12:amd64", help="image prefix for the VMs")
    p.add_argument("--no-baseline", action="store_true", help="skip the wait-false burst")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/ttci"))
    args = p.parse_args()
    setup_logging()
    t = parse_target(args.image)
    build_image(
        BuildSpec(parse_release(t.release), t.arch, profile=t.profile),
        args.image_path,
        args.cache_dir,
    )
    with (
        tempfile.TemporaryDirectory(prefix="tt-bench-queue-") as tmp,
        allinone.running(
            Path(tmp),
            args.image_path,
            scheduler_listen=f"127.0.0.1:{free_port()}",
            hostd_listen=f"127.0.0.1:{free_port()}",
            cpu_total=args.cpu_total,
            mem_total=args.mem_total,
        ) as stack,
    ):
        cfg = ClientConfig(stack.scheduler, stack.token)
        baseline = None
        if not args.no_baseline:
            baseline = fail_fast_burst(cfg, _burst(args.big, args.small), args.image, args.memory)
        jobs = _burst(args.big, args.small)
        wall = queued_burst(cfg, jobs, args.image, args.memory)
        left = Client(cfg).get("/v1/envs")
    s = summary(jobs, wall, baseline)
    s["left_behind"] = [e["name"] for e in left]
    print_report(jobs, s, args.cpu_total)
    write_json(
        args.json,
        {
            "image": args.image,
            "cpu_total": args.cpu_total,
            "summary": s,
            "jobs": [asdict(j) for j in jobs],
        },
    )
    ok = s["failed"] == 0 and s["small_not_last"] and not left
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
