"""The admin page: login with an admin token, a live view of the cloud, and a few actions.

A separate Flask app (mounted at /admin by `ttci.scheduler.admin.mount`) so browser sessions
and CSRF never mix with the bearer-token API. Sessions live on the server (a random id in a signed,
HttpOnly, SameSite=Strict cookie; kept in the database, admin/sessions.py, so any replica serves
them): logging out really ends them, and no token is ever stored
in the cookie or rendered on a page. A session keeps only its token's digest, and every request
checks it against the user store again: deleting the user (or its admin right) ends the session.
Failed logins are counted per client address (users.LoginThrottle): past a few, the address is
answered 429 with Retry-After until its wait is over; no worker thread ever sleeps.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect  # type: ignore[import-untyped]
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WResponse

from ttci.infra.http_server import read_body, strict_loads
from ttci.infra.sql import DatabaseUnavailable
from ttci.model.errors import BadInput, TTError
from ttci.scheduler import admission_store as qs
from ttci.scheduler.admin.sessions import SESSION_S, Recheck, Sessions, secret_key
from ttci.scheduler.admin.state import snapshot
from ttci.scheduler.core import EnvBusy
from ttci.scheduler.users import LoginThrottle, digest
from ttci.wire.envs import parse_duration

__all__ = [
    "MAX_LIFE_S",
    "SESSION_S",
    "Recheck",
    "Resolve",
    "Sessions",
    "bp",
    "cancel_queued",
    "create_admin_app",
    "delete_env",
    "delete_quota",
    "drain",
    "extend_env",
    "index",
    "login",
    "login_post",
    "logout",
    "set_quota",
    "state",
]

log = logging.getLogger("ttci.scheduler.admin")
MAX_LIFE_S = 30 * 86400  # parse_duration's limit
MAX_BODY = 64 * 1024  # an action's JSON body
Resolve = Callable[[str], Any]  # token -> user (with .name, .admin) or None

bp = Blueprint("admin", __name__, template_folder="templates", static_folder="static")


def _sessions() -> Sessions:
    s: Sessions = current_app.config["ADMIN_SESSIONS"]
    return s


def _error(status: int, message: str, hint: str | None = None) -> tuple[Response, int]:
    return jsonify({"error": message, **({"hint": hint} if hint else {})}), status


def _login_required(api: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kw: Any) -> Any:
            user = _sessions().user(session.get("sid"), current_app.config["ADMIN_RECHECK"])
            if user is None:
                if api:
                    return _error(401, "not logged in", "log in at the admin page with your token")
                return redirect(url_for("admin.login"))
            g.user = user
            return view(*args, **kw)

        return wrapper

    return deco


@bp.get("/login")
def login() -> str:
    return render_template("admin/login.html", error=None)


def _login_page(status: int, error: str, wait: float = 0) -> WResponse:
    resp = make_response(render_template("admin/login.html", error=error), status)
    if wait > 0:
        resp.headers["Retry-After"] = str(math.ceil(wait))
    return resp


@bp.post("/login")
def login_post() -> WResponse:
    throttle: LoginThrottle = current_app.config["ADMIN_THROTTLE"]
    client = request.remote_addr or "unknown"
    if wait := throttle.retry_after(client):  # refused unread: guessing gains nothing here
        log.warning("admin login from %s refused unread: %.0f s to wait", client, wait)
        return _login_page(429, f"too many failed logins: try again in {math.ceil(wait)} s", wait)
    token = request.form.get("token", "").strip()
    resolve: Resolve = current_app.config["ADMIN_RESOLVE"]
    user = resolve(token) if token else None
    if user is None or not user.admin:
        wait = throttle.failed(client)  # the token itself is never logged
        log.warning("admin login refused from %s", client)
        why = "that token is not an admin's" if user is not None else "wrong or missing token"
        if wait:
            why += f"; too many failed logins: try again in {math.ceil(wait)} s"
        return _login_page(429 if wait else 401, why, wait)
    throttle.succeeded(client)
    session.clear()
    session["sid"] = _sessions().start(digest(token))
    log.info("admin %s logged in from %s", user.name, client)
    return redirect(url_for("admin.index"))


@bp.post("/logout")
def logout() -> WResponse:
    _sessions().end(session.get("sid"))
    session.clear()
    return redirect(url_for("admin.login"))


@bp.get("/")
@_login_required(api=False)
def index() -> str:
    return render_template("admin/index.html", user=g.user.name)


@bp.get("/api/state")
@_login_required(api=True)
def state() -> Response:
    s = current_app.config["SCHEDULER"]
    q = request.args.get("q", "")[:200]
    resp = jsonify(snapshot(s.store, s.hosts(), s.images(), q, s.list_queue(g.user)))
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _body() -> dict[str, Any]:
    """The action's JSON object ({} without one), read the strict way (size, depth, numbers)."""
    if not request.is_json:
        return {}
    raw = read_body(MAX_BODY)
    body = strict_loads(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object", hint='e.g. {"life_time": "1h"}')
    return body


def _act(fn: Callable[[], Any]) -> tuple[Response, int]:
    """Run an action; errors become JSON with the scheduler's own words and hint."""
    try:
        return jsonify({"ok": True, "result": fn()}), 200
    except BadInput as e:
        return _error(400, e.message, e.hint)
    except TTError as e:
        name = type(e).__name__
        status = (
            404 if name.endswith("NotFound") else 409 if name.endswith(("Busy", "Exists")) else 500
        )
        return _error(status, e.message, e.hint)


@bp.post("/api/envs/<name>/delete")
@_login_required(api=True)
def delete_env(name: str) -> tuple[Response, int]:
    s = current_app.config["SCHEDULER"]
    log.info("admin %s deletes ENV %s", g.user.name, name)
    return _act(lambda: s.delete_env(name, g.user))


@bp.post("/api/envs/<name>/extend")
@_login_required(api=True)
def extend_env(name: str) -> tuple[Response, int]:
    """{"add": "1h"}: one more hour on top of what is left; {"life_time": "2h"}: 2 h from now."""
    s = current_app.config["SCHEDULER"]
    body = _body()

    def do() -> Any:
        if "add" in body:
            expires = dt.datetime.fromisoformat(s.show_env(name, g.user)["expires_at"])
            left = max(0, int((expires - dt.datetime.now(dt.UTC)).total_seconds()))
            seconds = min(left + parse_duration(body["add"]), MAX_LIFE_S)
        else:
            seconds = parse_duration(body.get("life_time", "1h"))
        log.info("admin %s extends ENV %s to %d s from now", g.user.name, name, seconds)
        return s.extend_env(name, g.user, seconds)

    return _act(do)


@bp.post("/api/queue/<name>/cancel")
@_login_required(api=True)
def cancel_queued(name: str) -> tuple[Response, int]:
    """Take a waiting ENV request out of the queue (its watchers hear it was cancelled)."""
    s = current_app.config["SCHEDULER"]

    def do() -> Any:
        if not s.cancel_queued(name, g.user):
            raise EnvBusy(
                f"ENV {name} is no longer queued",
                hint="it was granted meanwhile; delete it from the ENV list",
            )
        log.info("admin %s cancelled queued ENV %s", g.user.name, name)
        return {"name": name, "cancelled": True}

    return _act(do)


@bp.post("/api/quotas")
@_login_required(api=True)
def set_quota() -> tuple[Response, int]:
    """{"scope": "user"|"project"|"kind", "name", "vms", "cpus", "priority"} (null: no cap)."""
    s = current_app.config["SCHEDULER"]

    def do() -> Any:
        scope, name, quota = qs.parse_quota(_body())
        qs.set_quota(s.store, scope, name, quota)
        s.wake_dispatch()
        log.info("admin %s sets the quota of %s %s: %s", g.user.name, scope, name, quota)
        return {"scope": scope, "name": name, **quota.to_dict()}

    return _act(do)


@bp.post("/api/quotas/delete")
@_login_required(api=True)
def delete_quota() -> tuple[Response, int]:
    """{"scope", "name"}: back to the defaults (no cap, the kind's priority)."""
    s = current_app.config["SCHEDULER"]
    body = _body()
    scope, name = str(body.get("scope", "")), str(body.get("name", ""))
    if not qs.remove_quota(s.store, scope, name):
        return _error(404, f"no quota for {scope} {name!r}", "it was removed already")
    s.wake_dispatch()
    log.info("admin %s removes the quota of %s %s", g.user.name, scope, name)
    return jsonify({"ok": True, "result": {"scope": scope, "name": name, "deleted": True}}), 200


@bp.post("/api/hosts/<host_id>/drain")
@_login_required(api=True)
def drain(host_id: str) -> tuple[Response, int]:
    s = current_app.config["SCHEDULER"]
    body = _body()
    drained = body.get("drained", True)
    if not isinstance(drained, bool):
        return _error(400, "drained must be true or false", '{"drained": false} undrains')
    if not hasattr(s, "set_drain"):
        return _error(501, "this scheduler cannot drain hosts yet", "upgrade the scheduler")
    log.info("admin %s %s host %s", g.user.name, "drains" if drained else "undrains", host_id)
    return _act(lambda: s.set_drain(host_id, drained))


def _security_headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"  # job links never learn the admin URL
    return resp


def create_admin_app(scheduler: Any, resolve: Resolve, recheck: Recheck | None = None) -> Flask:
    """The admin page's app; scheduler is a ttci.scheduler.service.Scheduler. recheck: the
    user of a token digest now (default: the scheduler's user store)."""
    app = Flask("ttci.scheduler.admin")
    app.config.update(
        SECRET_KEY=secret_key(scheduler.store),  # the same on every replica
        SESSION_COOKIE_NAME="tt_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        WTF_CSRF_TIME_LIMIT=None,  # valid as long as the session
        WTF_CSRF_SSL_STRICT=False,  # the Referer check needs HTTPS; SameSite + token suffice
        SCHEDULER=scheduler,
        ADMIN_RESOLVE=resolve,
        ADMIN_RECHECK=recheck or scheduler.users.resolve_digest,
        ADMIN_SESSIONS=Sessions(scheduler.store),
        ADMIN_THROTTLE=LoginThrottle(),
    )
    CSRFProtect(app)
    app.register_blueprint(bp)
    app.after_request(_security_headers)

    @app.errorhandler(CSRFError)
    def _csrf(e: CSRFError) -> tuple[Response, int]:
        log.warning("admin request without a valid CSRF token refused: %s", e.description)
        return _error(
            400,
            f"refused: {e.description} (a forged request, or a page older than your session)",
            "reload the admin page and try again",
        )

    @app.errorhandler(TTError)
    def _tt_error(e: TTError) -> tuple[Response, int]:
        status = 503 if isinstance(e, DatabaseUnavailable) else 500  # 503: retry (a failover)
        return _error(400 if isinstance(e, BadInput) else status, e.message, e.hint)

    @app.errorhandler(Exception)
    def _bug(e: Exception) -> Any:
        if isinstance(e, HTTPException):
            return e
        log.error("admin %s %s failed", request.method, request.path, exc_info=e)
        return _error(500, "internal error (a bug): the scheduler's log has the details")

    @app.errorhandler(404)
    def _nf(e: Exception) -> tuple[Response, int]:
        return _error(404, f"no admin page at {request.path}", "start at /admin/")

    @app.errorhandler(405)
    def _na(e: Exception) -> tuple[Response, int]:
        return _error(405, f"{request.method} is not allowed on {request.path}")

    return app
