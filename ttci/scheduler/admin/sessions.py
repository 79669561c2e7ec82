"""The admin page's sessions, kept in the scheduler's database so that any replica accepts a
session another one started (and logging out on one ends it on all).

A session is a random id in the signed cookie; the database keeps only the id's SHA-256 (a copy
of the database opens no session), the digest of the token that logged in, and the expiry (by
the wall clock). The cookie's signing key is made once and kept in the database too (`meta`),
so every replica signs and checks cookies alike.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ttci.infra.sql import SqlStore

__all__ = ["SESSION_S", "Recheck", "Sessions", "secret_key"]

log = logging.getLogger("ttci.scheduler.admin")
SESSION_S = 8 * 3600
Recheck = Callable[[str], Any]  # the token's SHA-256 digest (hex) -> the user now, or None


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def secret_key(store: SqlStore) -> bytes:
    """The admin cookies' signing key: made by the first replica, read by the others."""
    with store.lock:
        store.db.execute(
            "insert into meta (name, value) values ('admin_secret_key', ?) "
            "on conflict (name) do nothing",
            [secrets.token_hex(32)],
        )
        row = store.db.execute("select value from meta where name = 'admin_secret_key'").fetchone()
    return bytes.fromhex(str(row[0]))


class Sessions:
    """Server-side admin sessions: id -> (the token's digest, expiry); never the token."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def start(self, token_sha256: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self.store.lock:
            self.store.db.execute("delete from admin_sessions where expires_at <= ?", [now])
            self.store.db.table("admin_sessions").insert(
                {"id": _key(sid), "token_sha256": token_sha256, "expires_at": now + SESSION_S}
            )
        return sid

    def user(self, sid: str | None, recheck: Recheck) -> Any:
        """The session's user as the user store has it now; None (and the session ends) when
        the session expired or its user is gone or no admin any more."""
        if not sid:
            return None
        row = self.store.db.execute(
            "select token_sha256 from admin_sessions where id = ? and expires_at > ?",
            [_key(sid), time.time()],
        ).fetchone()
        if row is None:
            return None
        user = recheck(str(row[0]))
        if user is None or not user.admin:
            log.warning("admin session ended: its user is gone or no longer an admin")
            self.end(sid)
            return None
        return user

    def end(self, sid: str | None) -> None:
        if sid:
            self.store.db.execute("delete from admin_sessions where id = ?", [_key(sid)])
