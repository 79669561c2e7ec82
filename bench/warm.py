"""Warm start benchmark: cold boot vs restore from a snapshot template, per architecture.

    python -m bench.warm [--runs 5] [--json out.json] [--only amd64] [--image-path DIR]
                         [--no-frontends]

hostd's own VM manager on a private libvirtd (in a throw-away state directory): for one image
per architecture, the template is made first (with its restore self-test), then `--runs` cold
boots and `--runs` warm starts, each timed from the create request to the agent's first answer
(the VM's network, disk, domain and identity included), median reported, and the ratio. Then a
4-VM ENV of amd64 created at once, cold vs warm (median of 3), to "every VM answered". Then
the front-ends on `tt up`'s stack (bench/warm_frontends.py): a GitLab job, prepare -> first
stage output, warm vs cold (TT_COLD=1), and GitHub queued -> run.sh started, warm.
Targets: warm >= 10x sooner than cold on every arch whose restore works, each warm start
<= 0.8 s, a 4-VM ENV <= 2 s, GitHub queued -> run.sh <= 1.5 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from bench.warm_frontends import frontends
from hostd.builders.image_recipe import DEFAULT_TARGETS
from hostd.images.catalogue import Image, scan
from hostd.vm.accel import choose_accel
from hostd.vm.engine import Engine
from hostd.vm.libvirtd import PrivateLibvirtd, become_subreaper
from hostd.vm.manager import HostConfig, VMManager
from hostd.vm.spares import SPARES
from hostd.vm.warm import TemplateSpec, spares, vcpus_for
from ttci.infra.log import setup_logging
from ttci.model.errors import TTError
from ttci.model.resources import Resources
from ttci.wire.envs import VMRequest

MEMORY_MIB = 512


def start_vm(mgr: VMManager, env: str, image: Image) -> tuple[float, dict[str, Any]]:
    """Create one VM; seconds until its agent answered (create returns then), and its row."""
    vm_id = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    row = mgr.create(
        VMRequest(vm_id, env, f"b-{vm_id}", "bench", image.name, memory_mib=MEMORY_MIB)
    )
    took = time.monotonic() - t0
    st, _, _ = mgr.agent(vm_id).output(["true"])
    assert st.ok
    return took, row


def timed_runs(mgr: VMManager, image: Image, runs: int, warm: bool) -> tuple[list[float], str]:
    mgr.templates.enabled = warm
    times, how = [], set()
    for _ in range(runs):
        took, row = start_vm(mgr, "bench", image)
        times.append(took)
        how.add(row["start"] + (f" ({row['warm_why']})" if row["warm_why"] else ""))
        mgr.delete(row["id"])
    return times, "; ".join(sorted(how))


def make_template(mgr: VMManager, image: Image) -> tuple[str, float]:
    """Make image's template (self-testing restore for its arch); what the self-test said."""
    accel, _ = choose_accel(image)
    disk_gib = max(1, image.manifest.disk_virtual_size >> 30)
    spec = TemplateSpec(image, vcpus_for(1), MEMORY_MIB, disk_gib, accel)
    mgr.templates.enabled = True
    t0 = time.monotonic()
    try:
        mgr.templates.make(spec)
    except TTError as e:
        print(f"{image.name}: no template: {e}", flush=True)
    made = time.monotonic() - t0
    tests = {t["arch"]: t for t in mgr.templates.selftests()}
    t = tests.get(image.manifest.arch)
    if t is None:
        return "not run", made
    return ("ok" if t["ok"] else "FAILED") + f" {t['passed']}/{t['tries']}", made


def env_of_four(mgr: VMManager, image: Image, warm: bool) -> tuple[float, str]:
    """Four VMs of one ENV created at once: seconds until every one answered."""
    mgr.templates.enabled = warm
    env = f"four-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: start_vm(mgr, env, image), range(4)))
    took = time.monotonic() - t0
    for _, row in results:
        mgr.delete(row["id"])
    return took, ",".join(sorted(r["start"] for _, r in results))


def use_spares(mgr: VMManager, on: bool) -> None:
    """Spare save file copies on (the default: kept full, waited for here) or off (every clone
    copies its template's save file, as before hostd/vm/spares.py)."""
    dirs = [Path(r["dir"]) for r in mgr.templates.rows("state = 'ready'")]
    mgr.templates.spares.keep = SPARES if on else 0
    while not on and mgr.templates.spares.busy():  # a copy under way would become a spare
        time.sleep(0.05)
    for d in dirs:
        if on:
            mgr.templates.spares.want(d)
        else:
            for f in spares(d):
                f.unlink(missing_ok=True)
    deadline = time.monotonic() + 120
    while on and time.monotonic() < deadline and any(len(spares(d)) < SPARES for d in dirs):
        time.sleep(0.1)


def spares_before_after(mgr: VMManager, image: Image, runs: int) -> dict[str, Any]:
    """amd64 warm starts, one and four at once, with a copy per clone (before) and with spare
    copies (now), alternated."""
    mgr.templates.enabled = True
    out: dict[str, Any] = {"one": {"copy": [], "spare": []}, "four": {"copy": [], "spare": []}}
    for _ in range(runs):
        for on in (False, True):
            use_spares(mgr, on)
            took, row = start_vm(mgr, "bench", image)
            mgr.delete(row["id"])
            out["one"]["spare" if on else "copy"].append(round(took, 3))
    for _ in range(3):
        for on in (False, True):
            use_spares(mgr, on)
            out["four"]["spare" if on else "copy"].append(
                round(env_of_four(mgr, image, True)[0], 3)
            )
    use_spares(mgr, True)
    return out


def pick_images(image_path: Path, only: list[str] | None) -> list[Image]:
    by_name = {i.name: i for i in scan(image_path)[0]}
    seen, out = set(), []
    for release, arch in DEFAULT_TARGETS:
        name = f"qemu:{release}:{arch.value}"
        if arch.value in seen or name not in by_name or (only and arch.value not in only):
            continue
        seen.add(arch.value)
        out.append(by_name[name])
    return out


def run_bench(mgr: VMManager, images: list[Image], runs: int) -> dict[str, Any]:
    rows, result = [], {"arches": [], "env4": {}}
    for image in images:
        selftest, made = make_template(mgr, image)
        cold, _ = timed_runs(mgr, image, runs, warm=False)
        warm, how = timed_runs(mgr, image, runs, warm=True)
        ratio = median(cold) / median(warm)
        entry = {
            "image": image.name,
            "arch": image.manifest.arch,
            "selftest": selftest,
            "template_s": round(made, 2),
            "cold_s": [round(x, 3) for x in cold],
            "warm_s": [round(x, 3) for x in warm],
            "cold_median_s": round(median(cold), 3),
            "warm_median_s": round(median(warm), 3),
            "ratio": round(ratio, 2),
            "warm_start": how,
        }
        result["arches"].append(entry)
        print(entry, flush=True)
        rows.append(
            [
                image.manifest.arch,
                selftest,
                f"{median(cold):.2f} s",
                f"{median(warm):.2f} s",
                f"{ratio:.1f}x",
                how[:60],
            ]
        )
    amd64 = [i for i in images if i.manifest.arch == "amd64"]
    if amd64:
        for warm in (False, True):
            runs4 = [env_of_four(mgr, amd64[0], warm) for _ in range(3)]
            took = median([t for t, _ in runs4])
            result["env4"]["warm" if warm else "cold"] = {
                "s": round(took, 3),
                "runs_s": [round(t, 3) for t, _ in runs4],
                "starts": "; ".join(sorted({h for _, h in runs4})),
            }
        result["spares"] = spares_before_after(mgr, amd64[0], runs)
    print_table(
        f"cold boot vs warm start to the first agent answer (median of {runs}, {MEMORY_MIB} MiB)",
        ["arch", "restore self-test", "cold", "warm", "ratio (target 10x)", "warm runs started"],
        rows,
    )
    if result["env4"]:
        e = result["env4"]
        print_table(
            "4-VM ENV (amd64) to every VM answered, median of 3 (target warm <= 2 s)",
            ["cold", "warm", "ratio", "warm starts"],
            [
                [
                    f"{e['cold']['s']:.2f} s",
                    f"{e['warm']['s']:.2f} s",
                    f"{e['cold']['s'] / e['warm']['s']:.1f}x",
                    e["warm"]["starts"],
                ]
            ],
        )
        sp = result.get("spares")
        if sp:
            print_table(
                "amd64 warm start: a save file copy per clone (before) vs spare copies (now)",
                ["", "copy per clone", "spare copies", "ratio"],
                [
                    [
                        label,
                        f"{median(sp[k]['copy']):.2f} s",
                        f"{median(sp[k]['spare']):.2f} s",
                        f"{median(sp[k]['copy']) / median(sp[k]['spare']):.2f}x",
                    ]
                    for k, label in (("one", "one VM"), ("four", "4-VM ENV"))
                ],
            )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="starts per mode and arch (median)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--image-path", type=Path, default=Path("/var/lib/ttci/images"))
    p.add_argument("--only", action="append", help="only these arches (e.g. amd64)")
    p.add_argument(
        "--no-frontends", action="store_true", help="skip the GitLab and GitHub end-to-end runs"
    )
    args = p.parse_args()
    setup_logging()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    images = pick_images(args.image_path, args.only)
    if not images:
        print(f"no images under {args.image_path}", file=sys.stderr)
        return 1
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="tt-bench-warm-", dir="/var/tmp") as tmp:
        state = Path(tmp)
        libvirtd = PrivateLibvirtd(state / "libvirt")
        libvirtd.start()
        mgr = VMManager(
            HostConfig("bench", args.image_path, state / "hostd", Resources(8, 16384, 200)),
            Engine(libvirtd.uri),
        )
        try:
            result = run_bench(mgr, images, args.runs)
        finally:
            mgr.shutdown(keep_vms=False)
            libvirtd.stop()
    if not args.no_frontends:
        result["frontends"] = fe = frontends(args.image_path, max(3, args.runs // 2 + 1))
        print_frontends(fe)
    if args.json:
        write_json(args.json, result)
    return 0


def print_frontends(fe: dict[str, Any]) -> None:
    gl = fe["gitlab_cold_s"], fe["gitlab_warm_s"]
    print_table(
        "front-ends on tt up's stack (debian-12 amd64, 384 MiB, medians)",
        ["what", "cold", "warm", "ratio", "target"],
        [
            [
                "GitLab job: prepare -> first stage output",
                f"{gl[0]:.2f} s",
                f"{gl[1]:.2f} s",
                f"{gl[0] / gl[1]:.1f}x",
                "",
            ],
            [
                "GitLab job: config to cleanup done",
                f"{fe['gitlab_cold_job_s']:.2f} s",
                f"{fe['gitlab_warm_job_s']:.2f} s",
                f"{fe['gitlab_cold_job_s'] / fe['gitlab_warm_job_s']:.1f}x",
                "",
            ],
            [
                "GitHub: queued -> run.sh started",
                "",
                f"{fe['github_warm_s']:.2f} s",
                "",
                "<= 1.5 s",
            ],
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
