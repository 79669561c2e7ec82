"""`tt-gitlab-executor`: the GitLab Runner custom-executor driver (config/prepare/run/cleanup).

Wire it in config.toml (`tt gitlab register` writes this):

    [runners.custom]
    config_exec = "/usr/local/bin/tt-gitlab-executor"
    config_args = ["--tt-config", "/etc/gitlab-runner/tt.json", "config"]
    prepare_exec = ...same..., prepare_args = [..., "prepare"]
    run_exec = ...same..., run_args = [..., "run"]      # the runner appends SCRIPT STAGE
    cleanup_exec = ...same..., cleanup_args = [..., "cleanup"]

Exit codes are the runner's: BUILD_FAILURE_EXIT_CODE when the job's script (or request) is at
fault, SYSTEM_FAILURE_EXIT_CODE for ours (the runner retries prepare). Nothing escapes as an
unhandled exception, which Python would report as exit 1, a build failure. A busy cloud is no
failure: prepare waits in the scheduler's admission queue, its place in line in the job log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from runner_executor.core import job
from ttci import __version__
from ttci.infra.settings import add_settings, resolve
from ttci.model.errors import TTError

__all__ = ["main", "make_parser"]

log = logging.getLogger("runner_executor")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tt-gitlab-executor",
        description="GitLab Runner custom executor: every job in a fresh TT CI VM",
    )
    p.add_argument("--version", action="version", version=f"tt-gitlab-executor {__version__}")
    add_settings(p, "tt-gitlab-executor")  # main resolves them
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    sub.add_parser("config", help="print the runner's config JSON")
    sub.add_parser(
        "prepare",
        help="create the job's VM (waiting in TT CI's queue while the cloud is busy; "
        "TT_MAX_WAIT bounds that) and wait for its agent",
    )
    r = sub.add_parser("run", help="run a stage's script in the VM")
    r.add_argument("script", type=Path, help="the script the runner generated")
    r.add_argument("name", help="the stage name (any: build_script, step_*, ...)")
    sub.add_parser("cleanup", help="delete the job's VM (safe to call twice)")
    return p


def main(argv: list[str] | None = None) -> int:
    codes = job.ExitCodes.from_env(os.environ)
    try:
        args = make_parser().parse_args(argv)
        resolve(args)  # flag > environment > /etc/ttci/tt-gitlab-executor.toml > default
    except SystemExit as e:  # a wrong config.toml: the operator's error, so a system failure
        return 0 if e.code == 0 else codes.system_failure
    except TTError as e:  # likewise: a bad setting
        hint = f"\n  hint: {e.hint}" if e.hint else ""
        print(f"tt-gitlab-executor: {e.message}{hint}", file=sys.stderr)
        return codes.system_failure
    if args.stage == "config":  # no scheduler needed: keep it fast (no HTTP client import)
        sys.stdout.write(json.dumps(job.config_output(__version__, job.job_vars(os.environ))))
        sys.stdout.write("\n")
        return 0
    from runner_executor.driver import Cancelled, Driver  # noqa: PLC0415
    from ttci.infra.log import mask, setup_logging  # noqa: PLC0415

    setup_logging(verbose=bool(os.environ.get("TT_DEBUG")))
    if args.tt_config:
        os.environ["TT_CONFIG"] = str(args.tt_config)
    limits = job.Limits(
        cpus=args.cpus,
        memory_mib=args.memory,
        disk_gib=args.disk,
        max_cpus=args.max_cpus,
        max_memory_mib=args.max_memory,
        max_disk_gib=args.max_disk,
    )
    d = Driver(dict(os.environ), limits, runner=args.runner_name)
    try:
        if args.stage == "prepare":
            return d.prepare()
        if args.stage == "run":
            rc = d.run(args.script, args.name)
            # The runner starts one driver per stage; skipping the interpreter's teardown
            # (module and object finalisation: ~25 ms here) is the cheapest part of a stage.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return d.cleanup()
    except Cancelled as e:
        d.say(e.message)
        d.record("cancelled")
        return codes.system_failure
    except TTError as e:
        d.say(f"{args.stage} failed: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""))
        if job.is_system_error(e):
            d.record("error")
            return codes.system_failure
        d.record("failed")
        d._write_build_code(1)
        return codes.build_failure
    except BaseException as e:  # our bug or an interrupt: never exit 1 (a build failure)
        d.say(f"{args.stage} failed inside the driver: {mask(repr(e))}")
        log.debug("%s", mask(traceback.format_exc()))
        return codes.system_failure
