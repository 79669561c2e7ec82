"""Users of the scheduler and their bearer tokens (stored only as SHA-256 digests).

The admin user comes from `--admin-token`; others are made by an admin (`tt user add`). Each
user sees only their own ENVs; admins see all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ttci.infra.db import Store, now
from ttci.model.errors import BadInput, TTError

__all__ = ["USER_RE", "User", "UserExists", "UserNotFound", "Users", "digest"]

USER_RE = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


class UserExists(TTError):
    """A user of that name exists."""


class UserNotFound(TTError):
    """No such user."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, store: Store, admin_token: str) -> None:
        self.store = store
        self._admin_digest = digest(admin_token) if admin_token else ""

    def resolve(self, token: str) -> User | None:
        """The user a bearer token belongs to, or None."""
        if not token:
            return None
        d = digest(token)
        if self._admin_digest and hmac.compare_digest(d, self._admin_digest):
            return User("admin", admin=True)
        with self.store.lock:
            rows = list(self.store.db.table("users").rows_where("token_sha256 = ?", [d]))
        return User(rows[0]["name"], bool(rows[0]["admin"])) if rows else None

    def add(self, name: str, admin: bool = False) -> dict[str, Any]:
        """Create a user; the token is returned once and never stored in clear."""
        if not USER_RE.match(name) or name in ("admin", "reaper"):
            raise BadInput(
                f"user name {name!r} is not valid",
                hint="1-32 lowercase letters, digits, _ or -, starting with a letter; not admin",
            )
        token = "ttu_" + secrets.token_urlsafe(24)
        with self.store.lock:
            if self.store.db.table("users").count_where("name = ?", [name]):
                raise UserExists(f"user {name} exists", hint="`tt user del` it first")
            self.store.db.table("users").insert(
                {
                    "name": name,
                    "admin": int(admin),
                    "token_sha256": digest(token),
                    "created_at": now(),
                }
            )
        return {"name": name, "admin": admin, "token": token}

    def list(self) -> list[dict[str, Any]]:
        with self.store.lock:
            rows = list(self.store.db.table("users").rows_where(order_by="name"))
        return [
            {"name": r["name"], "admin": bool(r["admin"]), "created_at": r["created_at"]}
            for r in rows
        ]

    def delete(self, name: str) -> None:
        with self.store.lock:
            if not self.store.db.table("users").count_where("name = ?", [name]):
                raise UserNotFound(f"no user {name!r}", hint="see `tt user list`")
            self.store.db.table("users").delete(name)
