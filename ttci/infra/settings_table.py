"""The settings table: one row per setting (shared, the client, tt-scheduler, tt-hostd; the CI
plugins' rows are ttci/infra/settings_ci_rows.py), and which settings each daemon takes
(ttci/infra/settings_programs.py).

A row's environment variable is TT_ + its name in capitals (`gh-max-vms` -> TT_GH_MAX_VMS) and its
flag is --NAME, unless the row spells another; a daemon may give a shared row its own flag
(`("hostd-token", "--token")`). Defaults are text, parsed like any other source. The machinery that
turns these rows into flags, help and values is ttci/infra/settings.py.
"""

from __future__ import annotations

from ttci.infra.settings_ci_rows import CI_ROWS
from ttci.infra.settings_kinds import (
    BOOL,
    DISK,
    DURATION,
    FLOAT,
    HOSTPORT,
    HOSTPORTS,
    INT,
    LIST,
    MEMORY,
    PATH,
    TEXT,
    Kind,
    Setting,
    on,
    split_hostport,
)
from ttci.infra.settings_programs import DAEMONS

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

_scheduler, _hostd = on("scheduler"), on("hostd")

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
    Setting(
        "server",
        TEXT,
        None,
        "the scheduler's ADDR:PORT, or its replicas' ADDR:PORT,ADDR:PORT,... (beats the config)",
        flag=None,
    ),
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
    _scheduler(
        "database",
        TEXT,
        "",
        "the state: a SQLite file (default: STATE_DIR/scheduler/scheduler.db) or "
        "postgresql://USER@HOST[:PORT]/DB, which replicas share (docs/operator/database.md)",
    ),
    Setting(
        "database-password-file",
        PATH,
        None,
        "file holding the PostgreSQL password (else the URL's, or libpq's PGPASSFILE)",
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
        "warm",
        BOOL,
        "true",
        "start VMs from snapshot templates where restore works (--no-warm: every VM boots cold)",
    ),
    _hostd(
        "storage",
        TEXT,
        "qcow2",
        "VM disks: qcow2 overlays, zfs:POOL/DATASET (clones of each image's dataset) or "
        "reflink:DIR (reflink copies on btrfs/XFS)",
        metavar="qcow2|zfs:POOL/DATASET|reflink:DIR",
    ),
    _hostd(
        "cache-size",
        MEMORY,
        "20G",
        "cache volumes on this host together; least recently used whole caches go above it",
    ),
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
        HOSTPORTS,
        None,
        "register with this scheduler (instead of being listed in its --server-set); "
        "replicas: ADDR:PORT,ADDR:PORT,... (tried in turn)",
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
    *CI_ROWS,
)
SETTINGS: dict[str, Setting] = {s.name: s for s in _ROWS}
