"""A hostd joining a scheduler: registration, heartbeats and the scheduler's answer. Pure.

hostd POSTs a HostRegistration to /v1/hosts/register once, then a Heartbeat to
/v1/hosts/heartbeat every `heartbeat_s` seconds (both with the pool's join token). Both carry
`info`: what hostd's own `GET /v1/host` shows (capacity, use, images, accelerator).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ttci.model.errors import BadInput
from ttci.wire.api import API_VERSION, check_api, require_object

__all__ = ["HOST_ID_RE", "URL_RE", "Heartbeat", "HostRegistration", "JoinAnswer"]

HOST_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
URL_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _host_id(d: dict[str, Any]) -> str:
    hid = str(d.get("id", ""))
    if not HOST_ID_RE.match(hid):
        raise BadInput(
            f"host id {hid!r} is not valid",
            hint="use 1-63 lowercase letters, digits, dots, dashes (pass --host-id)",
        )
    return hid


def _info(d: dict[str, Any], what: str) -> dict[str, Any]:
    info = d.get("info", {})
    if not isinstance(info, dict):
        raise BadInput(f"{what} info must be an object", hint="send hostd's /v1/host")
    return info


@dataclass(frozen=True)
class HostRegistration:
    """A hostd asking to join: where the scheduler reaches it and the token it must send."""

    id: str
    url: str  # http://ADDR:PORT of this hostd's API
    token: str  # the bearer token hostd wants from the scheduler (16+ characters)
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)
    api: int = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "id": self.id,
            "url": self.url,
            "token": self.token,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, d: Any) -> HostRegistration:
        """Raises BadInput naming the wrong field; ApiVersionError for another API version
        (a registration must say its version)."""
        d = require_object(d, "the host registration")
        hid = _host_id(d)
        url = str(d.get("url", ""))
        if not URL_RE.match(url):
            raise BadInput(
                f"host url {url!r} is not http://ADDR:PORT",
                hint="pass --advertise ADDR:PORT to hostd",
            )
        check_api(d, f"host {hid}", required=True)
        token = d.get("token")
        if not isinstance(token, str) or len(token) < 16:
            raise BadInput("registration lacks the host's token (16+ chars)", hint="hostd --token")
        return cls(id=hid, url=url, token=token, info=_info(d, "registration"))


@dataclass(frozen=True)
class Heartbeat:
    """A registered hostd's periodic report."""

    id: str
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"api": API_VERSION, "id": self.id, "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Any) -> Heartbeat:
        d = require_object(d, "the heartbeat")
        check_api(d, "the heartbeat")
        if not isinstance(d.get("info"), dict):
            raise BadInput("heartbeat info must be an object", hint="send hostd's /v1/host")
        return cls(id=str(d.get("id", "")), info=d["info"])


@dataclass(frozen=True)
class JoinAnswer:
    """The scheduler's answer to a registration or heartbeat: beat this often."""

    id: str
    heartbeat_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "heartbeat_s": self.heartbeat_s}

    @classmethod
    def from_dict(cls, d: Any) -> JoinAnswer:
        d = require_object(d, "the scheduler's join answer")
        try:
            return cls(id=str(d.get("id", "")), heartbeat_s=float(d.get("heartbeat_s", 5.0)))
        except (TypeError, ValueError) as e:
            raise BadInput(f"heartbeat_s is not a number: {e}", hint='"heartbeat_s": 5') from e
