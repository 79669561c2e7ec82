"""`tt job run`: one command in a fresh VM per target, for Jenkins and any shell-based CI.

Each target (OS x ARCH) gets a one-VM ENV: the working directory (or `git archive REF`) is copied
in, the command runs with its output streamed, declared artifacts are copied back, the job's
result is reported to the job history, and the ENV is deleted — also on Ctrl-C, SIGTERM, a
timeout or an error. The exit code is the command's (the first failing target's in a matrix).
The ENV's lifetime is the timeout plus a margin, so even a `kill -9` of `tt` leaks nothing for
long: the scheduler's reaper takes it back. While the cloud is busy a target waits in the
scheduler's admission queue (its place in line is printed); `--max-wait` bounds that wait, and a
target that got no VM in time exits EXIT_QUEUE_TIMEOUT (75) with nothing run.

This module holds the argparse side; the plan is job_plan, the runner job_runner, the printing
job_output and the tar helpers artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from ttci.cli.artifacts import empty_tar, fresh_dir, git_archive, max_files, tar_dir
from ttci.cli.cache_cmd import add_cache_args, cache_of
from ttci.cli.egress_args import add_egress_args
from ttci.cli.job_output import outcomes_json, print_summary
from ttci.cli.job_plan import (
    EXIT_QUEUE_TIMEOUT,
    EXIT_TIMEOUT,
    SCRIPT_DIR,
    JobSpec,
    job_exit,
    local_parent,
    parse_targets,
)
from ttci.cli.job_runner import Job
from ttci.cli.size_args import add_size_args, vm_size
from ttci.client import config
from ttci.client.scheduler import Client
from ttci.model.egress import parse_egress
from ttci.model.errors import BadInput
from ttci.wire.envs import parse_duration
from ttci.wire.queue import parse_wait_seconds

__all__ = ["cmd_job_run", "register"]


# -- the CLI ---------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    j = sub.add_parser("job", help="one-shot jobs in fresh VMs (for Jenkins and shell CI)")
    js = j.add_subparsers(dest="job_cmd", required=True, metavar="VERB")
    r = js.add_parser(
        "run",
        help="run a command in a fresh VM per OS x ARCH target; exit with its exit code",
        description="Create a one-VM ENV per target, copy the working directory in (or `git "
        "archive` a ref), run COMMAND in it with output streamed, copy artifacts back, delete "
        "the ENV (also on Ctrl-C, SIGTERM and timeout) and exit with the command's exit code. "
        "While the cloud is busy each target waits in the scheduler's queue, its place in line "
        f"printed. Exit codes: the command's (a matrix: the first failing target's); "
        f"{EXIT_TIMEOUT} when --timeout killed it; {EXIT_QUEUE_TIMEOUT} when no VM was free "
        "within --max-wait (nothing ran; retry later); 130 when interrupted; 2 for bad input; "
        "1 for other errors.",
    )
    r.add_argument(
        "--os",
        required=True,
        metavar="TARGET",
        help="OS release(s), comma separated, e.g. debian-12; a word may name its "
        "architecture too (the target grammar: debian-12:arm64, debian-12+systemd:amd64)",
    )
    r.add_argument(
        "--arch",
        help="architecture(s), comma separated, e.g. arm64 (for --os words without one)",
    )
    add_size_args(r, "of the VM", memory_default=1024)
    r.add_argument(
        "--timeout",
        default="1h",
        metavar="DURATION",
        help="kill the command after this long, e.g. 30m, 2h (default 1h)",
    )
    r.add_argument(
        "--max-wait",
        metavar="DURATION",
        help="wait at most this long in the queue for a VM, e.g. 90s, 10m, 2h (default: as "
        f"long as it takes); past it the target fails with exit code {EXIT_QUEUE_TIMEOUT}",
    )
    _add_copy_args(r)
    r.add_argument("--script", type=Path, help="run this local script instead of a COMMAND")
    add_egress_args(r, "the VM")
    add_cache_args(r)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only output")
    r.add_argument(
        "--json",
        action="store_true",
        help="print only a JSON summary on stdout (each target's result, exit code, times, "
        "artifacts); the commands' output goes to stderr",
    )
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    r.set_defaults(func=cmd_job_run)


def _add_copy_args(r: argparse.ArgumentParser) -> None:
    """What goes into the VM and what comes back."""
    r.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="PATH",
        help="file or directory to copy back (relative to the work directory); repeatable",
    )
    r.add_argument(
        "--artifact-dir",
        type=Path,
        default=Path("tt-artifacts"),
        help="a new or empty directory where artifacts land (default ./tt-artifacts; a matrix "
        "puts each target in a subdirectory); only the named paths are taken from the VM",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="let artifacts land in a --artifact-dir that is not empty",
    )
    src = r.add_mutually_exclusive_group()
    src.add_argument("--git-ref", help="copy `git archive REF` of this repository, not the tree")
    src.add_argument("--no-copy", action="store_true", help="copy nothing into the VM")
    r.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out matching files when copying the working directory; repeatable",
    )


def _spec(args: argparse.Namespace) -> JobSpec:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if bool(command) == bool(args.script):
        raise BadInput(
            "give either -- COMMAND or --script FILE (one of them)",
            hint="tt job run --os debian-12 --arch amd64 -- make test",
        )
    script = None
    if args.script:
        if not args.script.is_file():
            raise BadInput(f"script {args.script} does not exist", hint="give a local file")
        script = (args.script.name, args.script.read_bytes())
        argv = ["/bin/sh", "-c", 'chmod +x "$0" && exec "$0"', f"{SCRIPT_DIR}/{args.script.name}"]
    elif len(command) == 1:
        argv = ["/bin/sh", "-c", command[0]]  # one word: a shell command line
    else:
        argv = command
    targets = parse_targets(args.os, args.arch)
    max_wait = None if args.max_wait is None else parse_wait_seconds(args.max_wait, "--max-wait")
    here = Path.cwd()
    upload: Callable[[], bytes | None]
    if args.no_copy:
        upload = empty_tar  # still makes the work directory
    elif args.git_ref:
        upload = lambda: git_archive(args.git_ref, here)  # noqa: E731
    else:
        upload = lambda: tar_dir(here, args.exclude)  # noqa: E731
    cpus, memory_mib, disk_gib = vm_size(args)
    return JobSpec(
        targets=targets,
        argv=argv,
        cpus=cpus,
        memory_mib=memory_mib,
        disk_gib=disk_gib,
        timeout_s=parse_duration(args.timeout),
        artifacts=args.artifact,
        artifact_dir=args.artifact_dir,
        upload=upload,
        script=script,
        quiet=args.quiet,
        max_wait_s=max_wait,
        allow_egress=parse_egress(args.allow_egress),
        egress_audit=args.egress_audit,
        json_out=args.json,
        max_bytes=max_files(),
        cache=cache_of(args),
    )


def cmd_job_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    for a in spec.artifacts:
        local_parent(a, spec.artifact_dir)  # refuse bad paths before any VM exists
    if spec.artifacts:  # files from a VM go into a new or empty directory
        fresh_dir(spec.artifact_dir, args.overwrite, "--artifact-dir")
    job = Job(spec, Client(config.load()), dict(os.environ))
    outcomes = job.run_all()
    code = job_exit(outcomes)
    if spec.json_out:
        print(json.dumps(outcomes_json(outcomes, code), indent=2), flush=True)
    elif len(outcomes) > 1 or not spec.quiet:
        print_summary(outcomes)
    return code
