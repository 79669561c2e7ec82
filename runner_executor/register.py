"""`tt gitlab register`: create a GitLab runner (new workflow, `POST /user/runners`, a `glrt-`
token) with python-gitlab and write or print its config.toml section wired to tt-gitlab-executor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from runner_executor.core import runner_toml
from ttci.infra.extras import require
from ttci.model.errors import BadInput, TTError
from ttci.model.units import parse_cpus, parse_duration_s, parse_memory_mib

__all__ = [
    "DEFAULT_TAGS",
    "RegisterError",
    "cmd_register",
    "create_runner",
    "register",
    "runner_attrs",
]

log = logging.getLogger("runner_executor.register")
DEFAULT_TAGS = ("tt-ci",)


class RegisterError(TTError):
    """GitLab refused or could not be reached while creating the runner."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tt gitlab register` to the `tt` CLI."""
    g = sub.add_parser("gitlab", help="GitLab: register a runner that runs jobs in TT CI VMs")
    gs = g.add_subparsers(dest="gitlab_cmd", required=True, metavar="VERB")
    r = gs.add_parser(
        "register", help="create a runner in GitLab and write its config.toml section"
    )
    r.add_argument("--url", required=True, help="GitLab's address, e.g. https://gitlab.example.com")
    r.add_argument(
        "--token",
        help="a personal/group/project access token with create_runner scope "
        "(default: $GITLAB_TOKEN; never logged)",
    )
    scope = r.add_mutually_exclusive_group(required=True)
    scope.add_argument("--project", type=int, help="create a project runner for this project ID")
    scope.add_argument("--group", type=int, help="create a group runner for this group ID")
    scope.add_argument("--instance", action="store_true", help="create an instance runner (admin)")
    r.add_argument(
        "--tag",
        action="append",
        help=f"runner tag; repeat for more (default: {', '.join(DEFAULT_TAGS)})",
    )
    r.add_argument("--run-untagged", action="store_true", help="also take jobs without tags")
    r.add_argument("--description", default="tt-ci", help="the runner's name in GitLab")
    r.add_argument(
        "--maximum-timeout",
        metavar="DURATION",
        help="longest job GitLab lets this runner run, e.g. 3h (a bare number: seconds)",
    )
    r.add_argument(
        "--config",
        type=Path,
        help="config.toml to append the section to (created 0600); default: print it",
    )
    r.add_argument(
        "--executor",
        help="path of tt-gitlab-executor on the runner host (default: the one installed here)",
    )
    r.add_argument(
        "--tt-config",
        help="tt client config (scheduler, token) the executor uses (default: its own lookup)",
    )
    r.add_argument("--max-cpus", metavar="N", help="most vCPUs a job may ask (TT_CPUS)")
    r.add_argument(
        "--max-memory", metavar="SIZE", help="most memory a job may ask (TT_MEMORY): MiB or 2G"
    )
    r.add_argument("--limit", type=int, default=0, help="jobs at once on this runner (0: any)")
    r.add_argument(
        "--json",
        action="store_true",
        help="print the runner (id, type, tags, and its config.toml section unless --config "
        "wrote it) as JSON",
    )
    r.set_defaults(func=cmd_register)


def runner_attrs(args: argparse.Namespace) -> dict[str, Any]:
    """The body of `POST /user/runners` (GitLab docs, users.md "Create a runner")."""
    attrs: dict[str, Any] = {
        "description": args.description,
        "tag_list": list(args.tag or DEFAULT_TAGS),
        "run_untagged": bool(args.run_untagged),
    }
    if args.project is not None:
        attrs |= {"runner_type": "project_type", "project_id": args.project}
    elif args.group is not None:
        attrs |= {"runner_type": "group_type", "group_id": args.group}
    else:
        attrs["runner_type"] = "instance_type"
    if args.maximum_timeout:
        attrs["maximum_timeout"] = int(parse_duration_s(args.maximum_timeout, "--maximum-timeout"))
    return attrs


def create_runner(url: str, token: str, attrs: dict[str, Any]) -> tuple[int, str]:
    """Create the runner; returns (id, glrt- token).

    Raises:
        RegisterError: GitLab refused (with its message) or was unreachable.
    """
    require("gitlab", "tt gitlab register")  # the base install has no python-gitlab
    import gitlab  # noqa: PLC0415 - only this verb needs python-gitlab
    import requests  # noqa: PLC0415

    try:
        # No transient retries: a retried POST could create a second runner, and an
        # unreachable GitLab should fail at once rather than after minutes of back-off.
        gl = gitlab.Gitlab(url, private_token=token, retry_transient_errors=False, timeout=30)
        gl.auth()
        if gl.user is None:
            raise RegisterError(f"GitLab at {url} did not say who the token belongs to")
        runner = gl.user.runners.create(attrs)
    except gitlab.exceptions.GitlabAuthenticationError as e:
        raise RegisterError(
            f"GitLab at {url} refused the token: {e.error_message}",
            hint="use an access token with the create_runner scope (--token or $GITLAB_TOKEN)",
        ) from None
    except gitlab.exceptions.GitlabError as e:
        raise RegisterError(
            f"GitLab at {url} refused to create the runner ({e.response_code}): {e.error_message}",
            hint="check the project/group ID and that your token may create runners there",
        ) from None
    except requests.RequestException as e:
        raise RegisterError(
            f"cannot reach GitLab at {url}: {type(e).__name__}", hint="check --url"
        ) from None
    rtoken = str(getattr(runner, "token", ""))
    if not rtoken.startswith("glrt-"):
        raise RegisterError(
            "GitLab's answer has no glrt- runner token",
            hint="GitLab 16.0 or newer is needed for the new runner registration workflow",
        )
    return int(runner.id), rtoken


def cmd_register(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("GITLAB_TOKEN", "")
    if not token:
        raise BadInput("no GitLab token", hint="pass --token or set GITLAB_TOKEN")
    if not args.url.startswith(("http://", "https://")):
        raise BadInput(f"--url {args.url!r} is not an http(s) address", hint="https://gitlab...")
    executor = args.executor or shutil.which("tt-gitlab-executor")
    if not executor:
        executor = str(Path(sys.executable).parent / "tt-gitlab-executor")
    driver_args: list[str] = []
    if args.tt_config:
        driver_args += ["--tt-config", args.tt_config]
    if args.max_cpus is not None:
        driver_args += ["--max-cpus", f"{parse_cpus(args.max_cpus, '--max-cpus'):g}"]
    if args.max_memory is not None:
        driver_args += ["--max-memory", str(parse_memory_mib(args.max_memory, "--max-memory"))]
    attrs = runner_attrs(args)
    runner_id, rtoken = create_runner(args.url.rstrip("/"), token, attrs)
    log.info(
        "created runner %s (%s) with tags %s", runner_id, attrs["runner_type"], attrs["tag_list"]
    )
    section = runner_toml.RunnerSection(
        name=args.description,
        url=args.url.rstrip("/"),
        token=rtoken,
        executor_path=executor,
        driver_args=tuple(driver_args),
        limit=args.limit,
    ).render()
    made = {"runner_id": runner_id, "runner_type": attrs["runner_type"], "tags": attrs["tag_list"]}
    if args.config is None and args.json:
        print(json.dumps({**made, "config": None, "section": section}, indent=2))
        return 0
    if args.config is None:
        sys.stdout.write(section)
        print(
            f"# runner {runner_id} created; add the section above to config.toml "
            "(the token is shown only once)",
            file=sys.stderr,
        )
        return 0
    old = args.config.read_text() if args.config.exists() else ""
    args.config.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # it holds the runner's token
    with os.fdopen(fd, "w") as f:
        f.write(runner_toml.merge(old, section, concurrent=4))
    if args.json:
        print(json.dumps({**made, "config": str(args.config)}, indent=2))
    else:
        print(f"runner {runner_id} created; wrote its section to {args.config}")
    return 0
