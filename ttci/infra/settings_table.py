"""The settings table: one row per setting, and which settings each daemon takes.

A row's environment variable is TT_ + its name in capitals (`gh-max-vms` -> TT_GH_MAX_VMS) and its
flag is --NAME, unless the row spells another; a daemon may give a shared row its own flag
(`("hostd-token", "--token")`). Defaults are text, parsed like any other source. The machinery that
turns these rows into flags, help and values is ttci/infra/settings.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttci.model.errors import BadInput
from ttci.model.units import parse_disk_gib, parse_duration_s, parse_memory_mib

__all__ = [
    "BOOL",
    "DAEMONS",
    "DISK",
    "DURATION",
    "FLOAT",
    "HOSTPORT",
    "INT",
    "LIST",
    "MEMORY",
    "PATH",
    "SETTINGS",
    "TEXT",
    "Kind",
    "Setting",
    "split_hostport",
]


def split_hostport(text: str) -> tuple[str, int] | None:
    """`ADDR:PORT` (an `http://` or `https://` prefix is allowed) -> (host, port); None when it
    does not parse."""
    bare = text.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True)
class Kind:
    """How a setting's text parses; `parse` raises ValueError on text that is not `what`."""

    what: str
    example: str
    parse: Callable[[str], Any]
    metavar: str | None = None  # in --help; None: the flag's name in capitals


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _hostport(text: str) -> str:
    if split_hostport(text) is None:
        raise ValueError(text)
    return text


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


TEXT = Kind("text", "x", str)
PATH = Kind("a path", "/path", Path, "PATH")
INT = Kind("a whole number", "1", int, "N")
FLOAT = Kind("a number", "1.5", float, "N")
BOOL = Kind("true or false", "true", _bool)
HOSTPORT = Kind("ADDR:PORT", "127.0.0.1:7400", _hostport, "ADDR:PORT")
LIST = Kind("a comma-separated list", "a,b", _list)  # a flag: repeated; a file: an array


def _units(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A ttci/model/units.py parser as a Kind's (ValueError on bad text)."""

    def run(text: str) -> Any:
        try:
            return parse(text)
        except BadInput:
            raise ValueError(text) from None

    return run


# VM sizes and durations, spelled as everywhere (ttci/model/units.py).
MEMORY = Kind("MiB or a size such as 2G", "1024", _units(parse_memory_mib), "SIZE")
DISK = Kind("GiB or a size such as 20G", "20", _units(parse_disk_gib), "SIZE")
DURATION = Kind("a duration such as 90s, 10m, 2h", "10m", _units(parse_duration_s), "DURATION")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    default: str | None  # as text; None: unset (optional, or the daemon works it out)
    help: str  # a secret's help is a noun phrase: errors say "cannot read {help} from PATH"
    flag: str | None = ""  # "" -> --NAME; None: no flag (environment, or a file via `file`)
    env: str = ""  # "" -> TT_NAME
    secret: bool = False  # never shown, never read from a config file
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    file: str | None = None  # a secret's setting naming a file that holds it (beats `env`)
    old: tuple[str, str] | None = None  # a renamed row's old (flag, variable): deprecated

    def __post_init__(self) -> None:
        if self.flag == "":
            object.__setattr__(self, "flag", "--" + self.name)
        if not self.env:
            object.__setattr__(self, "env", "TT_" + self.name.upper().replace("-", "_"))

    def parse(self, text: str, where: str) -> Any:
        """Text from `where` (a flag, a variable, a file key) -> value, or BadInput saying why."""
        shown = "(secret)" if self.secret else repr(text)
        if self.choices and text not in self.choices:
            raise BadInput(
                f"{where} {shown} is not one of {', '.join(self.choices)}",
                hint=self._fix(where, self.choices[0]),
            )
        try:
            return self.kind.parse(text)
        except ValueError:
            raise BadInput(
                f"{where} {shown} is not {self.kind.what}",
                hint=self._fix(where, self.default or self.kind.example),
            ) from None

    def _fix(self, where: str, example: str) -> str:
        if where.startswith("--"):
            return f"write {self.kind.what}, e.g. {where} {example}"
        if where == self.env:
            return f"write {self.kind.what}, e.g. {self.env}={example}"
        return f"write {self.kind.what}, e.g. {where.split(maxsplit=1)[0]} = {example!r}"


def _on(prefix: str) -> Callable[..., Setting]:
    """Rows of one program: named PREFIX-FLAG (so TT_PREFIX_FLAG), flag --FLAG."""

    def row(flag: str, kind: Kind, default: str | None, help: str, **kw: Any) -> Setting:
        return Setting(f"{prefix}-{flag}", kind, default, help, flag="--" + flag, **kw)

    return row


_scheduler, _hostd, _gh, _gitlab = _on("scheduler"), _on("hostd"), _on("gh"), _on("gitlab")

_ROWS = (
    # Shared by several programs.
    Setting("image-path", PATH, "/var/lib/ttci/images", "where this host keeps its images"),
    Setting("cache-dir", PATH, "/var/cache/ttci", "build cache (rootfs and kernel trees)"),
    Setting("state-dir", PATH, "/var/lib/ttci/state", "the daemons' state (SQLite, sockets)"),
    Setting("mirror", TEXT, "http://deb.debian.org/debian", "Debian mirror for image builds"),
    Setting("max-files", MEMORY, "1G", "largest tar one push or get moves per VM (a guest's too)"),
    # Secrets: from the environment or the file their *-file row names (the file wins); a flag
    # still works but puts the secret where every local user sees it (ps), so it is warned of.
    Setting(
        "join-token",
        TEXT,
        "",
        "the token hostds present to join the scheduler",
        secret=True,
        file="join-token-file",
    ),
    Setting("join-token-file", PATH, None, "file holding the join token"),
    Setting(
        "hostd-token",
        TEXT,
        "",
        "the token hostd expects from the scheduler",
        secret=True,
        file="hostd-token-file",
    ),
    Setting("hostd-token-file", PATH, None, "file holding hostd's token"),
    Setting(
        "admin-token",
        TEXT,
        "",
        "the scheduler's admin token",
        secret=True,
        file="admin-token-file",
    ),
    Setting("admin-token-file", PATH, None, "file holding the admin token"),
    # The client (`tt`, and the CI plugins talking to the scheduler).
    Setting(
        "config",
        PATH,
        None,
        "the client config (default $XDG_CONFIG_HOME/tt/config.json, else "
        "~/.config/tt/config.json)",
        flag=None,
    ),
    Setting("server", TEXT, None, "the scheduler's ADDR:PORT (beats the config)", flag=None),
    Setting("token", TEXT, None, "the client's token (beats the config)", flag=None, secret=True),
    # TLS: the CA clients verify servers with (tt, CI plugins, scheduler -> hostd, hostd -> its
    # --join scheduler); a daemon's own certificate is its --tls-cert/--tls-key rows below.
    Setting(
        "ca-file",
        PATH,
        None,
        "CA certificate(s), PEM, that verify the HTTPS servers this program calls "
        "(unset: the system's trust store); a bare ADDR:PORT then means https",
        flag="--ca",
    ),
    # tt-scheduler
    _scheduler("listen", HOSTPORT, "127.0.0.1:7400", "ADDR:PORT of the API"),
    _scheduler(
        "server-set",
        TEXT,
        "",
        "static hostds: [ID=]ADDR:PORT[,...] (hosts may also register with --join-token)",
    ),
    _scheduler(
        "host-timeout", FLOAT, "15", "seconds without a heartbeat before a host is marked down"
    ),
    _scheduler("tls-cert", PATH, None, "serve HTTPS with this certificate, PEM (with --tls-key)"),
    _scheduler(
        "tls-key", PATH, None, "the certificate's private key, PEM (no other user may read it)"
    ),
    # tt-hostd serve
    _hostd("listen", HOSTPORT, "127.0.0.1:7420", "ADDR:PORT to serve on"),
    _hostd("tls-cert", PATH, None, "serve HTTPS with this certificate, PEM (with --tls-key)"),
    _hostd("tls-key", PATH, None, "the certificate's private key, PEM (no other user may read it)"),
    _hostd("host-id", TEXT, None, "this host's name in the pool (default: the hostname)"),
    _hostd("cpu-total", FLOAT, None, "vCPUs to hand out (default 2 per core)"),
    _hostd("mem-total", INT, None, "MiB of memory to hand out (default 80 %)"),
    _hostd("disk-total", INT, None, "GiB of disk to hand out (default 80 % free)"),
    _hostd("libvirt-uri", TEXT, "qemu:///system", "libvirt to drive"),
    _hostd(
        "private-libvirtd",
        BOOL,
        "false",
        "start an own libvirtd under --state-dir instead of using the system's",
    ),
    _hostd("keep-vms", BOOL, "false", "leave VMs running when stopped (a restart finds them)"),
    _hostd(
        "outgoing",
        TEXT,
        "allow",
        "may VMs reach outside through NAT (allow; ENVs can still --deny-outgoing) or never",
        choices=("allow", "deny"),
    ),
    _hostd("vm-net-pool", TEXT, "10.213.0.0/16", "IPv4 pool the ENV subnets come from"),
    _hostd("port-range", TEXT, "20000-29999", "host ports for --vm-port maps"),
    _hostd(
        "public-addr",
        TEXT,
        None,
        "address users reach port maps at (default: the --advertise or --listen address)",
    ),
    _hostd(
        "protect",
        TEXT,
        None,
        "control-plane addresses VMs must never reach, even through NAT (the --join "
        "scheduler is always protected)",
        metavar="ADDR[,ADDR]",
    ),
    _hostd(
        "dns", TEXT, "host", "upstreams of the ENVs' DNS forwarders: host, none or ADDR[:PORT],..."
    ),
    _hostd("allow-egress", TEXT, "", "egress rules every ENV gets (all it gets if it asks none)"),
    _hostd(
        "join",
        HOSTPORT,
        None,
        "register with this scheduler (instead of being listed in its --server-set)",
        metavar="ADDR:PORT",
    ),
    _hostd(
        "advertise",
        HOSTPORT,
        None,
        "where the scheduler reaches this hostd (default: --listen)",
        metavar="ADDR:PORT",
    ),
    _hostd("fetch-images", TEXT, "all", "pool images to fetch after --join: all, none, prefixes"),
    _hostd("fetch-rate", FLOAT, "0", "MiB/s that image fetches may use (0: no cap)"),
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
SETTINGS: dict[str, Setting] = {s.name: s for s in _ROWS}

# Per program (and subcommand): the settings it takes, by name or as (name, its flag there).
DAEMONS: dict[str, tuple[str | tuple[str, str], ...]] = {
    "tt-scheduler": (
        "scheduler-listen",
        "scheduler-server-set",
        "join-token",
        "join-token-file",
        "scheduler-host-timeout",
        "hostd-token",
        "hostd-token-file",
        "admin-token",
        "admin-token-file",
        "state-dir",
        "scheduler-tls-cert",
        "scheduler-tls-key",
        "ca-file",
        "max-files",
    ),
    "tt-hostd serve": (
        "hostd-listen",
        ("hostd-token", "--token"),
        ("hostd-token-file", "--token-file"),
        "hostd-host-id",
        "image-path",
        "state-dir",
        "hostd-cpu-total",
        "hostd-mem-total",
        "hostd-disk-total",
        "hostd-libvirt-uri",
        "hostd-private-libvirtd",
        "hostd-keep-vms",
        "hostd-outgoing",
        "hostd-vm-net-pool",
        "hostd-port-range",
        "hostd-public-addr",
        "hostd-protect",
        "hostd-dns",
        "hostd-allow-egress",
        "hostd-join",
        "join-token",
        "join-token-file",
        "hostd-advertise",
        "hostd-fetch-images",
        "hostd-fetch-rate",
        "hostd-tls-cert",
        "hostd-tls-key",
        "ca-file",
        "max-files",
    ),
    "tt-github-webhooks serve": (
        "gh-listen",
        ("config", "--tt-config"),  # the scheduler: its client config (server, token, CA)
        "gh-state-dir",
        "gh-secret-file",
        "gh-webhook-secret",
        "gh-api-url",
        "gh-app-id",
        "gh-app-key-file",
        "gh-app-key",
        "gh-token",
        "gh-token-file",
        "gh-scope",
        "gh-runner-group-id",
        "gh-label",
        "gh-max-age",
        "gh-cpus",
        "gh-memory",
        "gh-disk",
        "gh-life-time",
        "gh-runner-dir",
        "gh-push-runner",
        "gh-jit-via",
        "gh-max-waiting",
        "gh-max-vms",
        "gh-max-per-owner",
        "gh-reconcile-interval",
        "gh-runner-timeout",
        "gh-repo",
        "gh-allow-egress",
        "gh-egress-file",
        "gh-threads",
        "gh-admin-token-file",
        "gh-admin-token",
        "gh-tls-cert",
        "gh-tls-key",
        "ca-file",
    ),
    "tt-github-webhooks jobs": ("gh-state-dir",),
    "tt-gitlab-executor": (
        ("config", "--tt-config"),
        "gitlab-runner-name",
        "gitlab-cpus",
        "gitlab-memory",
        "gitlab-disk",
        "gitlab-max-cpus",
        "gitlab-max-memory",
        "gitlab-max-disk",
    ),
}
