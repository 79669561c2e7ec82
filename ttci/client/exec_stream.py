"""`POST /v1/envs/NAME/run` streamed with the standard library alone.

For callers that start a fresh process per command — the GitLab runner starts the driver once
per stage — importing requests (~150 ms here) would be most of the cost of a short stage.
Client.exec streams through here too, so there is one stream reader.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator

from ttci.client.config import ClientConfig
from ttci.infra.tls import client_context, tls_error
from ttci.model.errors import TTError
from ttci.wire.api import api_error
from ttci.wire.commands import ExecEvent, ExecRequest

__all__ = ["exec_events"]


def exec_events(
    cfg: ClientConfig, name: str, req: ExecRequest, connect_timeout: float = 10
) -> Iterator[ExecEvent]:
    """The command's events (stdout/stderr/exit/error, tagged with the VM) as they come.

    Raises:
        BadInput: the scheduler refused the request as malformed (400).
        ApiError: the scheduler refused it otherwise (no such ENV, ...).
        TTError: the scheduler could not be reached, or its stream broke off.
    """
    url = urllib.parse.urlsplit(cfg.url)
    conn: http.client.HTTPConnection
    if url.scheme == "https":  # verified against the configured CA (else the system's store)
        conn = http.client.HTTPSConnection(
            url.hostname or "", url.port, timeout=connect_timeout, context=client_context(cfg.ca)
        )
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=connect_timeout)
    try:
        try:
            conn.request(
                "POST",
                f"/v1/envs/{urllib.parse.quote(name, safe='')}/run",
                body=json.dumps(req.to_dict()).encode(),
                headers={
                    "Authorization": f"Bearer {cfg.token}",
                    "Content-Type": "application/json",
                },
            )
            if conn.sock is not None:
                conn.sock.settimeout(None)  # a command may be silent for as long as it likes
            r = conn.getresponse()
        except OSError as e:
            if tls := tls_error(e, f"the scheduler at {cfg.url}", cfg.ca):
                raise tls from e
            raise TTError(
                f"cannot reach the scheduler at {cfg.server}: {e}",
                hint="is `tt up` (or tt-scheduler) running? see `tt config`",
            ) from e
        if r.status >= 400:
            raise api_error(r.status, r.read(), r.reason)
        try:
            for line in r:
                if line.strip():
                    yield ExecEvent.from_dict(json.loads(line))
        except (OSError, http.client.HTTPException) as e:
            raise TTError(
                f"the scheduler's stream broke off: {e}",
                hint="`tt env show` tells the VMs' state; run the command again",
            ) from e
    finally:
        conn.close()
