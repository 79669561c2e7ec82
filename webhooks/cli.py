"""`tt-github-webhooks`: the GitHub webhook service (serve) and a view of its jobs (jobs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from ttci import __version__
from ttci.client import config as client_config
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging
from ttci.infra.settings import SETTINGS, add_settings, parse_hostport, resolve
from ttci.infra.tls import check_ca, tls_files
from ttci.infra.web_server import make_server
from ttci.model.egress import parse_egress
from ttci.model.errors import TTError
from ttci.wire.envs import parse_duration
from webhooks.app import create_app
from webhooks.core.caches import parse_cache_file
from webhooks.core.egress import RepoEgress, parse_egress_file
from webhooks.github_api import GitHubAPI, GitHubConfig
from webhooks.service import Service, Settings
from webhooks.store import JobStore

__all__ = ["DEFAULT_STATE", "list_jobs", "main", "make_parser", "serve"]

log = logging.getLogger("webhooks")
T = TypeVar("T")
DEFAULT_STATE = SETTINGS["gh-state-dir"].default or ""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tt-github-webhooks",
        description="GitHub workflow_job webhooks -> a fresh TT CI VM with a just-in-time runner "
        "per job. Secrets come from the environment or files, never from flags.",
    )
    p.add_argument("--version", action="version", version=f"tt-github-webhooks {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the webhook service (HTTPS with --tls-cert/--tls-key)")
    add_settings(s, "tt-github-webhooks serve")  # main resolves them
    j = sub.add_parser("jobs", help="list the jobs the service knows, newest first")
    add_settings(j, "tt-github-webhooks jobs")
    j.add_argument("--state", help="only jobs in this state (e.g. unservable, pending)")
    j.add_argument("--json", action="store_true", help="print JSON")
    return p


def _github(a: argparse.Namespace) -> GitHubAPI:
    key = a.gh_app_key
    return GitHubAPI(
        GitHubConfig(
            base_url=a.api_url.rstrip("/"),
            token=a.gh_token,
            app_id=a.app_id if key else "",
            private_key=key,
            scope=a.scope,
            runner_group_id=a.runner_group_id,
        )
    )


def _settings(a: argparse.Namespace) -> Settings:
    if a.push_runner and not (a.push_runner / "run.sh").is_file():
        raise TTError(
            f"{a.push_runner}/run.sh does not exist",
            hint="--push-runner takes the unpacked actions-runner directory",
        )
    return Settings(
        marker=a.label,
        max_age_s=a.max_age,
        vm_cpus=a.cpus,
        vm_memory_mib=a.memory,
        vm_disk_gib=a.disk,
        life_time=f"{parse_duration(a.life_time)}s",  # 10 s .. 30 days, refused at start
        runner_dir=a.runner_dir,
        runner_push_dir=a.push_runner,
        jit_via=a.jit_via,
        max_waiting=a.max_waiting,
        reconcile_interval_s=a.reconcile_interval,
        runner_timeout_s=a.runner_timeout,
        repos=tuple(a.repo),
        allow_egress=parse_egress(a.allow_egress),
        repo_egress=_egress_file(a.egress_file),
        repo_cache=_toml(a.cache_file, "--cache-file", parse_cache_file),
    )


def _toml(
    path: Path | None, what: str, parse: Callable[[dict[str, Any]], dict[str, T]]
) -> dict[str, T]:
    """A per-repository TOML file (--cache-file), parsed; {} when not given."""
    if path is None:
        return {}
    try:
        return parse(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TTError(f"cannot read {what} {path}: {e}", hint="a TOML file") from None


def _egress_file(path: Path | None) -> dict[str, RepoEgress]:
    if path is None:
        return {}
    try:
        return parse_egress_file(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TTError(f"cannot read --egress-file {path}: {e}", hint="a TOML file") from None


def serve(a: argparse.Namespace) -> int:
    """Run the service; `a` holds resolved settings (`main` resolves them)."""
    host, port = parse_hostport(a.listen, "--listen")
    if not a.gh_webhook_secret:
        raise TTError(
            "no webhook secret",
            hint="set TT_GH_WEBHOOK_SECRET or --secret-file; "
            "use the same secret in GitHub's webhook settings",
        )
    gh = _github(a)
    settings = _settings(a)
    store = _store(a)
    tls = tls_files(a.tls_cert, a.tls_key)
    tt = Client(_scheduler_config(a))
    _warn_deprecated(a, tt)
    svc = Service(settings, store, gh, tt)
    app = create_app(svc, a.gh_webhook_secret.encode(), a.gh_admin_token)
    server = make_server(app, host, port, name="tt-github-webhooks", tls=tls, threads=a.threads)
    svc.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        server.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "listening on %s/webhook (GitHub: %s, runners per %s)",
        server.url,
        a.api_url,
        a.scope,
    )
    try:
        server.run()
    except OSError:
        if not stop.is_set():
            raise
    finally:
        svc.stop()
    return 0


def _warn_deprecated(a: argparse.Namespace, tt: Client) -> None:
    """--max-vms and --max-per-owner are accepted and ignored: TT CI's admission queue and its
    quotas (one mechanism for every CI) cap GitHub's VMs now; say which command does it."""
    if a.max_vms is None and a.max_per_owner is None:
        return
    try:
        user = str(tt.status().get("user") or "USER")
    except TTError:
        user = "USER"  # the scheduler is not up yet: the name is the service's token's user
    if a.max_vms is not None:
        log.warning(
            "--max-vms %d is deprecated and ignored: GitHub jobs wait in TT CI's admission "
            "queue; to cap this service's VMs, an admin runs `tt user quota %s --vms %d`",
            a.max_vms,
            user,
            a.max_vms,
        )
    if a.max_per_owner is not None:
        log.warning(
            "--max-per-owner %d is deprecated and ignored: TT CI shares capacity fairly "
            "between repositories; to cap one, an admin runs `tt user quota --project "
            "github:OWNER/REPO --vms %d`",
            a.max_per_owner,
            a.max_per_owner,
        )


def _scheduler_config(a: argparse.Namespace) -> client_config.ClientConfig:
    """The scheduler: TT_SERVER/TT_TOKEN/TT_CA_FILE or the client config (--tt-config, or
    `tt-config` in the service's config file, names one); --ca verifies an https scheduler."""
    if a.tt_config:
        os.environ["TT_CONFIG"] = str(a.tt_config)  # what client_config.load reads
    cfg = client_config.load()
    return dataclasses.replace(cfg, ca=check_ca(a.ca, "--ca")) if a.ca else cfg


def _store(a: argparse.Namespace) -> JobStore:
    """The service's state: --database (a SQLite file or postgresql:// URL), or the SQLite
    file in --state-dir."""
    store = JobStore(a.database or Path(a.state_dir) / "github.db", a.database_password_file)
    log.info("state in %s", store.store.url)  # the password masked
    return store


def list_jobs(a: argparse.Namespace) -> int:
    path = Path(a.state_dir) / "github.db"
    if not a.database and not path.exists():
        raise TTError(f"no state at {path}", hint="pass the service's --state-dir or --database")
    rows = _store(a).recent(a.state)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(
            f"{r['id']:>12}  {r['state']:<12} {r['repo']:<30} {r['os_prefix'] or '-':<18} "
            f"{r['runner_name'] or '-':<16} {r['reason'] or ''}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    a = make_parser().parse_args(argv)
    setup_logging(a.verbose)
    try:
        resolve(a)  # flag > environment > /etc/ttci/tt-github-webhooks.toml > default
        return serve(a) if a.cmd == "serve" else list_jobs(a)
    except TTError as e:
        print(f"tt-github-webhooks: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 1
