"""Liveness and readiness, one convention for every daemon (tt-scheduler, tt-hostd,
tt-github-webhooks):

    GET /healthz   200 {"ok": true, "program", "version"}: the process serves HTTP (liveness)
    GET /readyz    200 when every check passes, else 503; the body names each check and what
                   failed: {"ready": bool, "failed": [names], "checks": {name: {"ok", "detail"
                   or "error", "ms"}}}

Both are open (no token), like /metrics: they say whether and why, never a secret. A daemon
hands `install_health` its checks; a check returns a short detail or raises with the reason.
Checks run at once, each bounded by CHECK_TIMEOUT_S (a hung libvirtd or scheduler is a failure
that says so, not a hung probe). The old `/v1/health` routes stay as they were (liveness).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, jsonify

from ttci import __version__

__all__ = [
    "CHECK_TIMEOUT_S",
    "HEALTH_ROUTES",
    "Check",
    "install_health",
    "readiness",
    "store_writable",
]

CHECK_TIMEOUT_S = 5.0
HEALTH_ROUTES = (("GET", "/healthz"), ("GET", "/readyz"))  # open routes (install_auth)
Check = Callable[[], object]  # returns a detail (str, or None) or raises saying why not


def store_writable(store: Any) -> str:
    """The daemon's database (ttci.infra.db.Store or ttci.infra.sql.SqlStore) takes a write."""
    return str(store.writable())


def _run(check: Check, out: dict[str, Any]) -> None:
    t0 = time.monotonic()
    try:
        detail = check()
        out.update(ok=True, **({"detail": str(detail)[:500]} if detail else {}))
    except Exception as e:  # any failure is the answer, in words
        message = getattr(e, "message", None) or str(e) or type(e).__name__
        out.update(ok=False, error=str(message)[:500])
    out["ms"] = round((time.monotonic() - t0) * 1000)


def readiness(
    checks: Mapping[str, Check], timeout: float = CHECK_TIMEOUT_S
) -> tuple[dict[str, Any], int]:
    """Run the checks in parallel: (body, 200 or 503)."""
    results: dict[str, dict[str, Any]] = {name: {} for name in checks}
    threads = [
        threading.Thread(target=_run, args=(fn, results[name]), daemon=True, name=f"ready-{name}")
        for name, fn in checks.items()
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for out in results.values():
        if "ok" not in out:  # still running: that is the answer
            out.update(ok=False, error=f"no answer within {timeout:g} s", ms=timeout * 1000)
    failed = [name for name, out in results.items() if not out["ok"]]
    body = {"ready": not failed, "failed": failed, "checks": results}
    return body, 503 if failed else 200


def install_health(app: Flask, program: str, checks: Mapping[str, Check]) -> None:
    """GET /healthz and GET /readyz on the app (open them in install_auth: HEALTH_ROUTES)."""

    @app.get("/healthz", endpoint="healthz_live")
    def healthz() -> Response:
        return jsonify({"ok": True, "program": program, "version": __version__})

    @app.get("/readyz", endpoint="readyz")
    def readyz() -> tuple[Response, int]:
        body, status = readiness(checks)
        return jsonify({"program": program, "version": __version__, **body}), status
