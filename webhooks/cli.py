"""`tt-github-webhooks`: the GitHub webhook service (serve) and a view of its jobs (jobs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import waitress

from ttci import __version__
from ttci.client import config as client_config
from ttci.client.scheduler import Client
from ttci.infra.log import setup_logging
from ttci.infra.settings import parse_hostport
from ttci.model.errors import TTError
from webhooks.app import create_app
from webhooks.github_api import GitHubAPI, GitHubConfig
from webhooks.service import Service, Settings
from webhooks.store import JobStore

__all__ = ["DEFAULT_STATE", "list_jobs", "main", "make_parser", "serve"]

log = logging.getLogger("webhooks")
DEFAULT_STATE = "/var/lib/ttci/github"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tt-github-webhooks",
        description="GitHub workflow_job webhooks -> a fresh TT CI VM with a just-in-time runner "
        "per job. Secrets come from the environment or files, never from flags.",
    )
    p.add_argument("--version", action="version", version=f"tt-github-webhooks {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the webhook service (waitress)")
    s.add_argument("--listen", default="127.0.0.1:7430", help="ADDR:PORT to serve on")
    s.add_argument(
        "--state-dir",
        default=os.environ.get("TT_GH_STATE_DIR", DEFAULT_STATE),
        help="where the SQLite state lives (TT_GH_STATE_DIR)",
    )
    s.add_argument(
        "--secret-file", help="file holding the webhook secret (else TT_GH_WEBHOOK_SECRET)"
    )
    s.add_argument(
        "--api-url",
        default=os.environ.get("TT_GH_API_URL", "https://api.github.com"),
        help="GitHub's REST API (TT_GH_API_URL; GHES: https://HOST/api/v3)",
    )
    s.add_argument(
        "--app-id",
        default=os.environ.get("TT_GH_APP_ID", ""),
        help="GitHub App id (TT_GH_APP_ID); with --app-key-file",
    )
    s.add_argument(
        "--app-key-file",
        default=os.environ.get("TT_GH_APP_KEY_FILE", ""),
        help="the App's private key, PEM (TT_GH_APP_KEY_FILE); without an App, TT_GH_TOKEN is used",
    )
    s.add_argument(
        "--scope",
        choices=("repo", "org"),
        default="repo",
        help="register JIT runners on the repository or on its organisation",
    )
    s.add_argument(
        "--runner-group-id",
        type=int,
        default=1,
        help="runner group of the JIT runners (1: Default)",
    )
    s.add_argument("--label", default="tt", help="the marker label jobs carry (runs-on)")
    s.add_argument(
        "--max-age",
        type=float,
        default=3600,
        help="refuse deliveries whose event is older than this many seconds",
    )
    s.add_argument("--cpus", type=float, default=1, help="CPUs per VM")
    s.add_argument("--mem", type=int, default=1024, help="MiB of memory per VM")
    s.add_argument("--disk", type=int, default=0, help="GiB of disk per VM (0: image default)")
    s.add_argument("--life-time", default="6h", help="longest life of a job's VM")
    s.add_argument(
        "--runner-dir", default="/opt/actions-runner", help="where run.sh lives in the image"
    )
    s.add_argument(
        "--push-runner",
        type=Path,
        help="local directory pushed into each VM at --runner-dir before start "
        "(for images without the runner; slower than baking it in)",
    )
    s.add_argument(
        "--jit-via",
        choices=("env", "argv"),
        default="env",
        help="hand the JIT config to run.sh as ACTIONS_RUNNER_INPUT_JITCONFIG (env, "
        "never in a process list) or as `--jitconfig` (argv)",
    )
    s.add_argument("--max-vms", type=int, default=10, help="VMs at once for all GitHub jobs")
    s.add_argument(
        "--max-per-owner", type=int, default=5, help="VMs at once per organisation or user"
    )
    s.add_argument(
        "--reconcile-interval",
        type=float,
        default=60,
        help="seconds between reconciliations with GitHub",
    )
    s.add_argument(
        "--runner-timeout",
        type=float,
        default=300,
        help="seconds a started runner may take to pick up its job",
    )
    s.add_argument(
        "--repo",
        action="append",
        default=[],
        help="OWNER/NAME also reconciled before any webhook came (repeatable)",
    )
    s.add_argument("--threads", type=int, default=16, help="waitress worker threads")
    s.add_argument("--admin-token-file", help="file with a bearer token that guards /jobs")
    j = sub.add_parser("jobs", help="list the jobs the service knows, newest first")
    j.add_argument(
        "--state-dir",
        default=os.environ.get("TT_GH_STATE_DIR", DEFAULT_STATE),
        help="the service's state directory",
    )
    j.add_argument("--state", help="only jobs in this state (e.g. unservable, pending)")
    j.add_argument("--json", action="store_true", help="print JSON")
    return p


def _read_secret(path: str | None, env: str, what: str) -> str:
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise TTError(
                f"cannot read {what} from {path}: {e.strerror}",
                hint="check the path and its permissions",
            ) from e
    return os.environ.get(env, "")


def serve(a: argparse.Namespace) -> int:
    host, port = parse_hostport(a.listen, "--listen")
    secret = _read_secret(a.secret_file, "TT_GH_WEBHOOK_SECRET", "the webhook secret")
    if not secret:
        raise TTError(
            "no webhook secret",
            hint="set TT_GH_WEBHOOK_SECRET or --secret-file; "
            "use the same secret in GitHub's webhook settings",
        )
    key = _read_secret(a.app_key_file, "TT_GH_APP_KEY", "the App key")
    gh = GitHubAPI(
        GitHubConfig(
            base_url=a.api_url.rstrip("/"),
            token=os.environ.get("TT_GH_TOKEN", ""),
            app_id=a.app_id if key else "",
            private_key=key,
            scope=a.scope,
            runner_group_id=a.runner_group_id,
        )
    )
    if a.push_runner and not (a.push_runner / "run.sh").is_file():
        raise TTError(
            f"{a.push_runner}/run.sh does not exist",
            hint="--push-runner takes the unpacked actions-runner directory",
        )
    settings = Settings(
        marker=a.label,
        max_age_s=a.max_age,
        vm_cpus=a.cpus,
        vm_memory_mib=a.mem,
        vm_disk_gib=a.disk,
        life_time=a.life_time,
        runner_dir=a.runner_dir,
        runner_push_dir=a.push_runner,
        jit_via=a.jit_via,
        max_total=a.max_vms,
        max_per_owner=a.max_per_owner,
        reconcile_interval_s=a.reconcile_interval,
        runner_timeout_s=a.runner_timeout,
        repos=tuple(a.repo),
    )
    store = JobStore(Path(a.state_dir) / "github.db")
    svc = Service(settings, store, gh, Client(client_config.load()))
    admin = _read_secret(a.admin_token_file, "TT_GH_ADMIN_TOKEN", "the admin token")
    app = create_app(svc, secret.encode(), admin)
    server = waitress.create_server(app, host=host, port=port, threads=a.threads)
    svc.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        server.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "listening on http://%s:%d/webhook (GitHub: %s, runners per %s)",
        host,
        port,
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


def list_jobs(a: argparse.Namespace) -> int:
    path = Path(a.state_dir) / "github.db"
    if not path.exists():
        raise TTError(f"no state at {path}", hint="pass the service's --state-dir")
    rows = JobStore(path).recent(a.state)
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
        return serve(a) if a.cmd == "serve" else list_jobs(a)
    except TTError as e:
        print(f"tt-github-webhooks: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 1
