"""The Flask app: a blueprint that verifies, parses and hands over; slow work is elsewhere."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from ttci.infra.health import Check, install_health, store_writable
from ttci.infra.http_server import BodyTooLarge, bearer_ok, read_body, strict_loads
from ttci.model.errors import BadInput
from webhooks.core.jobs import check_delivery_id
from webhooks.core.signature import SignatureError, verify
from webhooks.service import Service

__all__ = ["MAX_BODY", "bp", "create_app", "jobs", "metrics", "readiness_checks", "webhook"]

bp = Blueprint("github", __name__)
MAX_BODY = 25 * 1024 * 1024  # GitHub caps payloads at 25 MB
MAX_DEPTH = 64  # GitHub's payloads nest a few levels


def _svc() -> Service:
    svc: Service = current_app.config["SERVICE"]
    return svc


def _error(status: int, message: str, hint: str, event: str = "?") -> tuple[Response, int]:
    _svc().metrics.deliveries.labels(event[:40], f"refused_{status}").inc()
    current_app.logger.warning("delivery refused (%s): %s", status, message)
    return jsonify({"error": message, "hint": hint}), status


@bp.post("/webhook")
def webhook() -> tuple[Response, int]:
    t0 = time.monotonic()
    try:
        return _webhook()
    finally:
        _svc().metrics.latency.observe(time.monotonic() - t0)


def _webhook() -> tuple[Response, int]:
    try:  # the size from Content-Length before reading; counted for a body without one
        body = read_body(MAX_BODY)
    except BodyTooLarge:
        return _error(413, "the body is larger than GitHub's 25 MB", "this is not GitHub")
    event = request.headers.get("X-GitHub-Event", "")
    try:
        verify(
            current_app.config["WEBHOOK_SECRET"], body, request.headers.get("X-Hub-Signature-256")
        )
    except SignatureError as e:
        return _error(401, e.message, e.hint or "", event or "?")
    if not event:
        return _error(400, "the delivery has no X-GitHub-Event header", "this is not GitHub")
    delivery = request.headers.get("X-GitHub-Delivery")
    problem = check_delivery_id(delivery)
    if problem or delivery is None:
        return _error(400, problem or "no delivery id", "GitHub sends a GUID per delivery", event)
    if not (request.mimetype or "").endswith("json"):
        return _error(
            415,
            f"content type {request.mimetype!r} is not JSON",
            "set the webhook's content type to application/json",
            event,
        )
    try:  # strict: no NaN/Infinity, no huge numbers, no deep nesting
        payload: Any = strict_loads(body, max_depth=MAX_DEPTH)
    except BadInput as e:
        return _error(400, f"the body is not JSON: {e.message}", "send GitHub's payload", event)
    status, out = _svc().handle_delivery(event, delivery, payload)
    return jsonify(out), status


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(_svc().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/jobs")
def jobs() -> tuple[Response, int]:
    """Jobs as we see them (state, reason, runner, VM) for operators; no secrets in here."""
    token = current_app.config.get("ADMIN_TOKEN") or ""
    if token and not bearer_ok(token):
        return jsonify({"error": "a bearer token is needed", "hint": "--admin-token"}), 401
    return jsonify(_svc().jobs(request.args.get("state") or None)), 200


def readiness_checks(service: Service) -> dict[str, Check]:
    """GET /readyz: the service's database takes writes and TT CI's scheduler answers."""

    def scheduler() -> str:
        status = service.tt.status()
        return f"answers (as {status.get('user', '?')}, {status.get('hosts_up', '?')} hosts up)"

    return {"database": lambda: store_writable(service.store.store), "scheduler": scheduler}


def create_app(service: Service, secret: bytes, admin_token: str = "") -> Flask:
    """The WSGI app. secret: the webhook secret (bytes); admin_token guards /jobs if set."""
    app = Flask("webhooks")
    app.config.update(SERVICE=service, WEBHOOK_SECRET=secret, ADMIN_TOKEN=admin_token)
    app.register_blueprint(bp)
    install_health(app, "tt-github-webhooks", readiness_checks(service))  # /healthz, /readyz

    @app.errorhandler(Exception)
    def _bug(e: Exception) -> Any:
        if isinstance(e, HTTPException):
            return e
        app.logger.error("%s %s failed", request.method, request.path, exc_info=e)
        return jsonify({"error": "internal error (a bug): see the service's log"}), 500

    return app
