"""A hostd that joins a scheduler by itself: register with the join token, then heartbeat.

The registration binds the host id to this hostd's own token; heartbeats bear that token (not
the join token), so nobody else can beat for this host. Heartbeats carry what `/v1/host` shows
(capacity, use, images, accelerator), so the scheduler places from fresh numbers without
polling. A scheduler that forgot the host (404) gets a new registration; one that is away is
retried quietly; a refusal (wrong token, other version, the id bound to another host's token)
is fatal for the first registration and logged afterwards, as is a report the scheduler refused.
An https scheduler is verified against `ca` (tt-hostd --ca; else the system's trust store); a
certificate that does not verify is fatal at the first registration too.

Several scheduler replicas (--join A:PORT,B:PORT): a registration or heartbeat that cannot
reach one (refused, DNS, timeout, reset, or a 503 with Retry-After) goes to the next at once
(both may be repeated safely), and the one that answered is asked first from then on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from ttci.client.failover import (
    MANY_CONNECT_S,
    AllFailed,
    Failure,
    Servers,
    Sticky,
    retryable_503,
    split_servers,
)
from ttci.infra.tls import tls_error
from ttci.model.errors import TTError
from ttci.wire.api import ErrorBody
from ttci.wire.hosts import Heartbeat, HostRegistration, JoinAnswer

__all__ = ["JoinRefused", "Joiner"]

log = logging.getLogger("hostd.service.joiner")


class JoinRefused(TTError):
    """The scheduler refused this host."""


class Joiner:
    def __init__(
        self,
        *,
        scheduler: str | Sequence[str],
        join_token: str,
        host_id: str,
        advertise_url: str,
        host_token: str,
        info: Callable[[], dict[str, Any]],
        ca: Path | None = None,
    ) -> None:
        self.servers = Servers(split_servers(scheduler), Sticky(persist=False))
        self.on_move: Callable[[str], None] | None = None  # told the replica that answers now
        self.ca = ca
        self.host_id = host_id
        self.advertise_url = advertise_url
        self.host_token = host_token
        self.info = info
        self.session = requests.Session()
        # Passed on each request: a session's verify loses to REQUESTS_CA_BUNDLE.
        self._verify: str | bool = str(ca) if ca else True
        self._join_auth = f"Bearer {join_token}"
        self._host_auth = f"Bearer {host_token}"
        self.interval = 5.0
        self._stop = threading.Event()
        self.last_ok: float | None = None  # monotonic time of the scheduler's last answer
        self.last_error = ""

    @property
    def url(self) -> str:
        """The scheduler replica asked first (the one that answered last)."""
        return self.servers.order()[0]

    def _send(self, url: str, path: str, body: dict[str, Any], auth: str) -> requests.Response:
        r = self.session.post(
            url + path,
            json=body,
            timeout=(MANY_CONNECT_S if self.servers.many else 10, 10),
            headers={"Authorization": auth},
            verify=self._verify,
        )
        if retryable_503(r.status_code, r.headers.get("Retry-After"), r.content):
            r.raise_for_status()  # an HTTPError: _failure_of lets it move on
        return r

    def _post(self, path: str, body: dict[str, Any], auth: str) -> JoinAnswer:
        was = self.url
        try:
            r = self.servers.call(lambda u: self._send(u, path, body, auth), _failure_of, True)
        except AllFailed as e:
            raise e.last from e  # what the beat loop logs and retries
        if self.url != was:
            log.warning("scheduler %s did not answer; %s did", was, self.url)
            if self.on_move is not None:
                self.on_move(self.url)
        if r.status_code in (400, 403, 409):
            err = ErrorBody.decode(r.content, r.reason)
            raise JoinRefused(
                f"scheduler {self.url} refused host {self.host_id}: {err.error}", hint=err.hint
            )
        r.raise_for_status()
        answer = JoinAnswer.from_dict(r.json())
        self.last_ok, self.last_error = time.monotonic(), ""
        if answer.report_error:
            log.warning("%s refused our report: %s", self.url, answer.report_error)
        return answer

    def register(self) -> None:
        reg = HostRegistration(self.host_id, self.advertise_url, self.host_token, self.info())
        answer = self._post("/v1/hosts/register", reg.to_dict(), self._join_auth)
        self.interval = answer.heartbeat_s
        log.info("joined %s as %s (heartbeat every %.1f s)", self.url, self.host_id, self.interval)

    def beat(self) -> None:
        try:
            beat = Heartbeat(self.host_id, self.info())
            answer = self._post("/v1/hosts/heartbeat", beat.to_dict(), self._host_auth)
            self.interval = answer.heartbeat_s
        except requests.HTTPError as e:
            if e.response is not None and e.response.status_code == 404:
                self.register()  # the scheduler forgot us (new state): join again
            else:
                raise

    def start(self) -> None:
        """Register now (a refusal raises: the operator must fix it), then beat in a thread.

        A scheduler that is not up yet is no refusal: the thread keeps trying."""
        registered = False
        try:
            self.register()
            registered = True
        except requests.exceptions.SSLError as e:  # not "away": fix the CA or the certificate
            tls = tls_error(e, f"the scheduler at {self.url}", self.ca)
            raise JoinRefused(
                tls.message if tls else f"TLS with the scheduler at {self.url} failed: {e}",
                hint="give tt-hostd --ca (TT_CA_FILE) the CA that signed the scheduler's "
                "certificate",
            ) from e
        except requests.RequestException as e:
            self.last_error = str(e)
            log.warning("scheduler %s not reachable yet (%s); retrying", self.url, e)

        def loop() -> None:
            nonlocal registered
            while not self._stop.wait(self.interval if registered else 2.0):
                try:
                    if registered:
                        self.beat()
                    else:
                        self.register()
                        registered = True
                except (requests.RequestException, TTError) as e:
                    self.last_error = getattr(e, "message", None) or str(e)
                    log.warning("heartbeat to %s failed: %s", self.url, e)

        threading.Thread(target=loop, name="joiner", daemon=True).start()

    def ready(self) -> str:
        """For /readyz: "joined ..." while the scheduler answered within three heartbeats;
        else TTError saying since when and why not."""
        if self.last_ok is None:
            raise TTError(f"not joined yet: {self.last_error or 'no answer yet'}")
        ago = time.monotonic() - self.last_ok
        if ago > 3 * self.interval + 10:
            raise TTError(f"no answer from the scheduler for {ago:.0f} s: {self.last_error}")
        return f"joined as {self.host_id}, last answer {ago:.0f} s ago"

    def stop(self) -> None:
        self._stop.set()


def _failure_of(e: Exception) -> Failure | None:
    """Registrations and heartbeats may be repeated: any failure to get an answer moves on,
    but not a TLS failure (the CA or the certificate: fatal) or a decision."""
    if isinstance(e, requests.exceptions.SSLError):
        return None
    if isinstance(e, requests.HTTPError):
        return Failure.UNAVAILABLE  # _send raises it only for a retryable 503
    if isinstance(e, requests.ConnectionError | requests.Timeout):
        return Failure.CONNECT
    return None
