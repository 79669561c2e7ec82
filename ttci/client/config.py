"""The CLI's client configuration: which scheduler, which token, which CA (`tt config`).

`server` may name several scheduler replicas: a JSON list in the file, or commas
(`TT_SERVER=a:7400,b:7400`); the clients try them in turn (ttci/client/failover.py).
The CA (`TT_CA_FILE`, or the config's `ca`) verifies an https scheduler; with one, a bare
ADDR:PORT means https (ttci/infra/tls.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttci.client.failover import split_servers
from ttci.infra.settings import env_text, parse_hostport
from ttci.infra.tls import base_url, check_ca
from ttci.model.errors import BadInput

__all__ = ["ClientConfig", "config_path", "load", "save"]


def config_path() -> Path:
    """TT_CONFIG, else $XDG_CONFIG_HOME/tt/config.json (the XDG base directories; a relative
    XDG_CONFIG_HOME is ignored, as the specification says), else ~/.config/tt/config.json."""
    named = env_text("config")
    if named:
        return Path(named)
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "tt" / "config.json"


@dataclass(frozen=True)
class ClientConfig:
    server: str  # ADDR:PORT or a URL; several replicas: separated by commas
    token: str
    ca: Path | None = None  # verifies an https scheduler (None: the system's trust store)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every replica's base URL, in the configured order."""
        return tuple(base_url(s, self.ca) for s in split_servers(self.server))

    @property
    def url(self) -> str:
        """The first replica's base URL (the one address, without replicas)."""
        return self.urls[0] if self.urls else base_url(self.server, self.ca)


def _server_text(value: object, path: Path) -> str:
    """The file's `server`: text, or a list of texts (several replicas) joined by commas."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(split_servers(value))
    if isinstance(value, str):
        return value
    raise BadInput(
        f"server in {path} is neither an address nor a list of addresses",
        hint='write "server": "ADDR:PORT" or ["ADDR:PORT", "ADDR:PORT"] (`tt config --server`)',
    )


def load() -> ClientConfig:
    data: dict[str, Any] = {}
    path = config_path()
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise BadInput(
                f"{path} is not valid JSON: {e}", hint="rewrite it with `tt config`"
            ) from e
    # The settings table's order: the environment (TT_SERVER, TT_TOKEN) beats the file.
    server = env_text("server") or _server_text(data.get("server", ""), path)
    token = env_text("token") or data.get("token", "")
    if not server:
        raise BadInput(
            "no scheduler configured",
            hint="run `tt up` (all-in-one), or `tt config --server ADDR:PORT --token -` (the "
            "token on stdin)",
        )
    ca_env = env_text("ca-file")
    ca_text = ca_env or data.get("ca", "")
    ca = check_ca(Path(ca_text), "TT_CA_FILE" if ca_env else f"ca in {path}") if ca_text else None
    return ClientConfig(server, token, ca)


def save(server: str | None, token: str | None, ca: str | None = None) -> Path:
    """Update the config file (0600); None leaves a value as it is, ca "" removes the CA."""
    path = config_path()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if server is not None:
        servers = split_servers(server)
        for one in servers or (server,):
            parse_hostport(one, "--server")
        data["server"] = servers[0] if len(servers) == 1 else list(servers)
    if token is not None:
        data["token"] = token
    if ca is not None:
        data["ca"] = str(check_ca(Path(ca).resolve(), "--ca")) if ca else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the token: never 0644
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    return path
