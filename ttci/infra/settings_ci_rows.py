"""The CI plugins' settings rows: tt-github-webhooks (gh-*) and tt-gitlab-executor (gitlab-*)."""

from __future__ import annotations

from ttci.infra.settings_kinds import (
    DISK,
    DURATION,
    FLOAT,
    HOSTPORT,
    INT,
    LIST,
    MEMORY,
    PATH,
    TEXT,
    Setting,
    on,
)

__all__ = ["CI_ROWS"]

_gh, _gitlab = on("gh"), on("gitlab")

CI_ROWS: tuple[Setting, ...] = (
    # tt-github-webhooks: secrets from the environment or the file a flag names
    Setting(
        "gh-webhook-secret",
        TEXT,
        "",
        "the webhook secret",
        flag=None,
        secret=True,
        file="gh-secret-file",
    ),
    Setting("gh-app-key", TEXT, "", "the App key", flag=None, secret=True, file="gh-app-key-file"),
    Setting(
        "gh-token",
        TEXT,
        "",
        "a GitHub token, used without an App",
        flag=None,
        secret=True,
        file="gh-token-file",
    ),
    Setting(
        "gh-admin-token",
        TEXT,
        "",
        "the admin token",
        flag=None,
        secret=True,
        file="gh-admin-token-file",
    ),
    _gh("listen", HOSTPORT, "127.0.0.1:7430", "ADDR:PORT to serve on"),
    _gh("tls-cert", PATH, None, "serve HTTPS with this certificate, PEM (with --tls-key)"),
    _gh("tls-key", PATH, None, "the certificate's private key, PEM (no other user may read it)"),
    _gh("state-dir", PATH, "/var/lib/ttci/github", "where the SQLite state lives"),
    _gh(
        "database",
        TEXT,
        "",
        "the state: a SQLite file (default: STATE_DIR/github.db) or postgresql://USER@HOST/DB",
    ),
    _gh("secret-file", PATH, None, "file holding the webhook secret"),
    _gh("token-file", PATH, None, "file holding a GitHub token (instead of TT_GH_TOKEN)"),
    _gh("api-url", TEXT, "https://api.github.com", "GitHub's REST API (GHES: https://HOST/api/v3)"),
    _gh("app-id", TEXT, "", "GitHub App id; with --app-key-file"),
    _gh(
        "app-key-file",
        PATH,
        None,
        "the App's private key, PEM (without an App, TT_GH_TOKEN is used)",
    ),
    _gh(
        "scope",
        TEXT,
        "repo",
        "register JIT runners on the repository or on its organisation",
        choices=("repo", "org"),
    ),
    _gh("runner-group-id", INT, "1", "runner group of the JIT runners (1: Default)"),
    _gh("label", TEXT, "tt", "the marker label jobs carry (runs-on)"),
    _gh("max-age", DURATION, "3600", "refuse deliveries whose event is older than this"),
    _gh("cpus", FLOAT, "1", "vCPUs per VM"),
    _gh("memory", MEMORY, "1024", "memory per VM", old=("--mem", "TT_GH_MEM")),
    _gh("disk", DISK, "0", "disk per VM (0: image default)"),
    _gh("life-time", DURATION, "6h", "longest life of a job's VM"),
    _gh("runner-dir", TEXT, "/opt/actions-runner", "where run.sh lives in the image"),
    _gh(
        "push-runner",
        PATH,
        None,
        "local directory pushed into each VM at --runner-dir before start "
        "(for images without the runner; slower than baking it in)",
    ),
    _gh(
        "jit-via",
        TEXT,
        "env",
        "hand the JIT config to run.sh as ACTIONS_RUNNER_INPUT_JITCONFIG (env, "
        "never in a process list) or as `--jitconfig` (argv)",
        choices=("env", "argv"),
    ),
    _gh(
        "max-waiting",
        INT,
        "8",
        "jobs kept waiting in TT CI's admission queue at once (each holds a stream to the "
        "scheduler); the rest wait here, shared out between repositories (0: hand none over)",
    ),
    _gh(
        "max-vms",
        INT,
        None,
        "deprecated, ignored: TT CI's quotas cap GitHub's VMs (`tt user quota USER --vms N` "
        "for the service's scheduler user)",
    ),
    _gh(
        "max-per-owner",
        INT,
        None,
        "deprecated, ignored: cap a repository with `tt user quota --project "
        "github:OWNER/REPO --vms N`",
    ),
    _gh("reconcile-interval", DURATION, "60", "time between reconciliations with GitHub"),
    _gh("runner-timeout", DURATION, "300", "how long a started runner may take to pick up its job"),
    _gh("repo", LIST, "", "OWNER/NAME also reconciled before any webhook came (repeatable)"),
    _gh("allow-egress", TEXT, "", "egress allow-list of every job's VM (list GitHub's own hosts)"),
    _gh("egress-file", PATH, None, "per-repository egress allow-lists: docs/user/github.md"),
    _gh("cache-file", PATH, None, "per-repository cache volumes (KEY:/path): docs/user/github.md"),
    _gh("threads", INT, "16", "HTTP worker threads"),
    _gh("admin-token-file", PATH, None, "file with a bearer token that guards /jobs"),
    # tt-gitlab-executor (its flags come from the runner's config.toml; job.Limits' defaults)
    _gitlab("runner-name", TEXT, None, "shown to operators as the ENV's origin runner"),
    _gitlab("cpus", FLOAT, "1", "default vCPUs"),
    _gitlab("memory", MEMORY, "1024", "default memory"),
    _gitlab("disk", DISK, "0", "default disk (0: image size)"),
    _gitlab("max-cpus", FLOAT, "4", "most vCPUs a job may ask"),
    _gitlab("max-memory", MEMORY, "8192", "most memory a job may ask"),
    _gitlab("max-disk", DISK, "64", "most disk a job may ask"),
)
