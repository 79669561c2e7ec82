"""Users of the scheduler and their bearer tokens (stored only as SHA-256 digests).

The admin user comes from `--admin-token`; others are made by an admin (`tt user add`). Each
user sees only their own ENVs; admins see all.

ENV names are one namespace, so the names CI services need are reserved to them: `gl-<job id>`
to users made with `--service gitlab` (the GitLab executor's account), `gh-<job id>-<attempt>`
to `--service github` (the GitHub service's); admins may use any name. Anyone else asking for
such a name is refused (NameReserved), so nobody can squat a name a CI job will need.

Failed admin logins are counted per client address (LoginThrottle): a few are free, then the
address must wait, longer after each failure; the answer says how long (no worker sleeps).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ttci.infra.db import now
from ttci.infra.sql import IntegrityError, SqlStore
from ttci.model.errors import BadInput, TTError

__all__ = [
    "SERVICES",
    "USER_RE",
    "LoginThrottle",
    "NameReserved",
    "User",
    "UserExists",
    "UserNotFound",
    "Users",
    "check_env_name",
    "digest",
    "reserved_for",
]

USER_RE = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")
# Service accounts and the ENV names reserved to them (what their drivers name ENVs).
SERVICES: dict[str, re.Pattern[str]] = {
    "gitlab": re.compile(r"\Agl-[0-9]+\Z"),  # runner_executor: gl-<CI_JOB_ID>
    "github": re.compile(r"\Agh-[0-9]+-[0-9]+\Z"),  # webhooks: gh-<job id>-<attempt>
}


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False
    service: str = ""  # "", or a SERVICES key: the CI service this account is


class UserExists(TTError):
    """A user of that name exists."""


class UserNotFound(TTError):
    """No such user."""


class NameReserved(TTError):
    """The ENV name is reserved to a CI service's account."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def reserved_for(env_name: str) -> str | None:
    """The service whose ENV names look like env_name, or None."""
    return next((svc for svc, pattern in SERVICES.items() if pattern.match(env_name)), None)


def check_env_name(user: User, env_name: str) -> None:
    """Raise NameReserved if user may not create an ENV of that name."""
    svc = reserved_for(env_name)
    if svc is None or user.admin or user.service == svc:
        return
    raise NameReserved(
        f"ENV name {env_name!r} is reserved to the {svc} service's account",
        hint="pick another name (names like gl-N and gh-N-N are for CI jobs)",
    )


class Users:
    def __init__(self, store: SqlStore, admin_token: str) -> None:
        self.store = store
        self._admin_digest = digest(admin_token) if admin_token else ""

    def resolve(self, token: str) -> User | None:
        """The user a bearer token belongs to, or None."""
        return self.resolve_digest(digest(token)) if token else None

    def resolve_digest(self, token_sha256: str) -> User | None:
        """The user whose token has this SHA-256 digest (hex), or None: what an admin page
        session re-checks on every request (a deleted user's session ends)."""
        if not token_sha256:
            return None
        if self._admin_digest and hmac.compare_digest(token_sha256, self._admin_digest):
            return User("admin", admin=True)
        rows = self.store.db.table("users").rows_where("token_sha256 = ?", [token_sha256])
        if not rows:
            return None
        r = rows[0]
        return User(r["name"], bool(r["admin"]), str(r.get("service") or ""))

    def add(self, name: str, admin: bool = False, service: str = "") -> dict[str, Any]:
        """Create a user; the token is returned once and never stored in clear."""
        if not USER_RE.match(name) or name in ("admin", "reaper", "metrics"):
            raise BadInput(
                f"user name {name[:40]!r} is not valid",
                hint="1-32 lowercase letters, digits, _ or -, starting with a letter; not admin",
            )
        if service and service not in SERVICES:
            raise BadInput(
                f"service {service[:40]!r} is unknown", hint=f"one of {', '.join(SERVICES)}"
            )
        token = "ttu_" + secrets.token_urlsafe(24)
        exists = UserExists(f"user {name} exists", hint="`tt user del` it first")
        try:
            with self.store.lock:
                if self.store.db.table("users").count_where("name = ?", [name]):
                    raise exists
                self.store.db.table("users").insert(
                    {
                        "name": name,
                        "admin": int(admin),
                        "token_sha256": digest(token),
                        "created_at": now(),
                        "service": service,
                    }
                )
        except IntegrityError:  # another replica added it at the same moment
            raise exists from None
        return {"name": name, "admin": admin, "service": service, "token": token}

    def list(self) -> list[dict[str, Any]]:
        with self.store.lock:
            rows = list(self.store.db.table("users").rows_where(order_by="name"))
        return [
            {
                "name": r["name"],
                "admin": bool(r["admin"]),
                "service": str(r.get("service") or ""),
                "created_at": r["created_at"],
            }
            for r in rows
        ]

    def delete(self, name: str) -> None:
        with self.store.lock:
            if not self.store.db.table("users").count_where("name = ?", [name]):
                raise UserNotFound(f"no user {name!r}", hint="see `tt user list`")
            self.store.db.table("users").delete(name)


class LoginThrottle:
    """Failed logins per key (a client address): `free` failures, then each further failure
    locks the key for twice as long as the last one (1 s up to max_lock_s); failures are
    forgotten after window_s without one, and a success clears the key. At most max_keys keys
    are kept (the oldest go first), so a flood from many addresses costs bounded memory."""

    def __init__(
        self,
        *,
        free: int = 5,
        max_lock_s: float = 300.0,
        window_s: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.max_lock_s, self.window_s, self.max_keys = (
            free,
            max_lock_s,
            window_s,
            max_keys,
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[int, float, float]] = {}  # failures, locked until, last

    def retry_after(self, key: str) -> float:
        """Seconds before key may try again (0: now)."""
        with self._lock:
            entry = self._keys.get(key)
        return max(0.0, entry[1] - self._clock()) if entry else 0.0

    def failed(self, key: str) -> float:
        """Count a failure; the seconds key must now wait (0 while failures are free)."""
        t = self._clock()
        with self._lock:
            failures, _, last = self._keys.pop(key, (0, 0.0, t))
            if t - last > self.window_s:
                failures = 0
            failures += 1
            over = failures - self.free
            lock = min(self.max_lock_s, 2.0 ** min(over - 1, 30)) if over > 0 else 0.0
            self._keys[key] = (failures, t + lock, t)
            while len(self._keys) > self.max_keys:
                del self._keys[next(iter(self._keys))]
        return lock

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)
