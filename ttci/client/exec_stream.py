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
from ttci.client.failover import MANY_CONNECT_S, AllFailed, Failure, Servers, retryable_503
from ttci.infra.tls import client_context, tls_error
from ttci.model.errors import ApiError, TTError
from ttci.wire.api import api_error
from ttci.wire.commands import ExecEvent, ExecRequest

__all__ = ["MAY_HAVE_RUN", "exec_events"]

MAY_HAVE_RUN = (
    "the command may have run (or still be running) in the VMs: `tt env show` tells their "
    "state; run it again when it is safe to (any replica will do)"
)


def _connection(url: str, cfg: ClientConfig, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":  # verified against the configured CA (else the system's store)
        return http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=client_context(cfg.ca)
        )
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


class _Unavailable(Exception):
    """The replica answered 503 with Retry-After: it did nothing; try the next."""


def _open(
    url: str, cfg: ClientConfig, name: str, body: bytes, connect_timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """The run request sent to one replica and its answer's head. Only the connect may fail
    over (ConnectError): once the request may have left, a failure says the command may
    have run."""
    conn = _connection(url, cfg, connect_timeout)
    try:
        try:
            conn.connect()
        except OSError as e:
            if tls := tls_error(e, f"the scheduler at {url}", cfg.ca):
                raise tls from e
            raise _ConnectError(str(e)) from e
        try:
            conn.request(
                "POST",
                f"/v1/envs/{urllib.parse.quote(name, safe='')}/run",
                body=body,
                headers={
                    "Authorization": f"Bearer {cfg.token}",
                    "Content-Type": "application/json",
                },
            )
            if conn.sock is not None:
                conn.sock.settimeout(None)  # a command may be silent for as long as it likes
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise TTError(
                f"the scheduler at {url} dropped the connection before answering: {e}",
                hint=MAY_HAVE_RUN,
            ) from e
        if r.status == 503:  # read here: a retryable one moves on (ttci/client/failover.py)
            body = r.read()
            if retryable_503(503, r.getheader("Retry-After"), body):
                raise _Unavailable(r.status)
            raise api_error(503, body, r.reason)
    except BaseException:
        conn.close()
        raise
    return conn, r


class _ConnectError(Exception):
    """No connection to this replica: the request never left."""


def _failure_of(e: Exception) -> Failure | None:
    if isinstance(e, _ConnectError):
        return Failure.CONNECT
    return Failure.UNAVAILABLE if isinstance(e, _Unavailable) else None


def exec_events(
    cfg: ClientConfig, name: str, req: ExecRequest, connect_timeout: float = 10
) -> Iterator[ExecEvent]:
    """The command's events (stdout/stderr/exit/error, tagged with the VM) as they come.
    Sent to the first replica that takes it (ttci/client/failover.py): a replica that cannot
    be reached is skipped; one whose stream breaks is named in the error.

    Raises:
        BadInput: the scheduler refused the request as malformed (400).
        ApiError: the scheduler refused it otherwise (no such ENV, ...).
        TTError: no replica could be reached, or the stream broke off (the command may have
            run: the error says so).
    """
    servers = Servers(cfg.urls)
    timeout = min(connect_timeout, MANY_CONNECT_S) if servers.many else connect_timeout
    body = json.dumps(req.to_dict()).encode()
    holder: list[str] = []

    def send(url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        holder[:] = [url]
        return _open(url, cfg, name, body, timeout)

    try:
        conn, r = servers.call(send, _failure_of, idempotent=False)
    except AllFailed as e:
        if isinstance(e.last, _Unavailable):
            raise ApiError(
                f"no scheduler replica can take the command now ({e.message})",
                hint="retry in a moment",
                status=503,
            ) from e
        raise
    try:
        if r.status >= 400:
            raise api_error(r.status, r.read(), r.reason)
        yield from _read(r, holder[0])
    finally:
        r.close()  # its socket: closing conn alone leaves it to the GC
        conn.close()


def _read(r: http.client.HTTPResponse, url: str) -> Iterator[ExecEvent]:
    """The stream's events; a stream that ends before every VM in it said how its command
    ended (exit or error) broke off too: a replica that dies may close it cleanly."""
    started: set[str] = set()  # VMs whose events came
    ended: set[str] = set()  # VMs whose command's end came ("": the whole run's)
    try:
        for line in r:
            if line.strip():
                ev = ExecEvent.from_dict(json.loads(line))
                (ended if ev.final else started).add(ev.vm)
                yield ev
    except (OSError, http.client.HTTPException) as e:
        raise TTError(
            f"the scheduler at {url} broke off the command's stream: {e}", hint=MAY_HAVE_RUN
        ) from e
    if not ended or (started - ended and "" not in ended):
        raise TTError(
            f"the scheduler at {url} broke off the command's stream before it ended",
            hint=MAY_HAVE_RUN,
        )
