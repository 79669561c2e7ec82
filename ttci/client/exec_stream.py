"""`POST /v1/envs/NAME/run` streamed with the standard library alone.

For callers that start a fresh process per command — the GitLab runner starts the driver once
per stage — importing requests (~150 ms here) would be most of the cost of a short stage.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

from ttci.client.config import ClientConfig
from ttci.model.errors import ApiError, BadInput, TTError

__all__ = ["run_events"]


def run_events(
    cfg: ClientConfig, name: str, body: dict[str, Any], connect_timeout: float = 10
) -> Iterator[dict[str, Any]]:
    """The command's events (stdout/stderr/exit/error, tagged with the VM) as they come."""
    url = urllib.parse.urlsplit(cfg.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=connect_timeout)
    try:
        try:
            conn.request(
                "POST",
                f"/v1/envs/{urllib.parse.quote(name, safe='')}/run",
                body=json.dumps(body).encode(),
                headers={
                    "Authorization": f"Bearer {cfg.token}",
                    "Content-Type": "application/json",
                },
            )
            if conn.sock is not None:
                conn.sock.settimeout(None)  # a command may be silent for as long as it likes
            r = conn.getresponse()
        except OSError as e:
            raise TTError(
                f"cannot reach the scheduler at {cfg.server}: {e}",
                hint="is `tt up` (or tt-scheduler) running? see `tt config`",
            ) from e
        if r.status >= 400:
            raw = r.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"error": raw[:300].decode(errors="replace") or r.reason}
            if r.status == 400:
                raise BadInput(str(err.get("error")), hint=err.get("hint"))
            raise ApiError(str(err.get("error")), hint=err.get("hint"), status=r.status)
        try:
            for line in r:
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException) as e:
            raise TTError(
                f"the scheduler's stream broke off: {e}",
                hint="`tt env show` tells the VMs' state; run the command again",
            ) from e
    finally:
        conn.close()
