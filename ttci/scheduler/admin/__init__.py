"""Operators' view of the cloud: the admin page (/admin/), Prometheus metrics (/metrics) and the
job-result API (POST /v1/envs/<name>/result), attached to the scheduler's app by `mount`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from flask import Flask
from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from ttci.scheduler.admin.jobs_api import bp as jobs_bp
from ttci.scheduler.admin.views import Resolve, create_admin_app
from ttci.scheduler.metrics import scheduler_registry
from ttci.scheduler.users import User

_METRICS_USER = User("metrics", admin=True)  # sees every waiting request, changes nothing


def mount(
    app: Flask,
    scheduler: Any,
    *,
    current_user: Callable[[], Any],
    resolve: Resolve,
) -> None:
    """Add the admin page, /metrics and the job-result API to the scheduler's app.

    Args:
        current_user: the API's user of the current request (after bearer auth).
        resolve: token -> user (with .name and .admin) or None, for the admin login.
    """
    app.config["JOBS_CURRENT_USER"] = current_user
    app.register_blueprint(jobs_bp)
    admin = create_admin_app(scheduler, resolve)
    metrics = make_wsgi_app(
        scheduler_registry(
            scheduler.store,
            lambda: {w["env"]: w["blocked_by"] for w in scheduler.list_queue(_METRICS_USER)},
            getattr(scheduler, "leases", None),
        )
    )
    # Mounted beside the API app, so neither its bearer auth nor its error handlers apply.
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/admin": admin.wsgi_app, "/metrics": metrics}
    )


def token_resolver(users: dict[str, Any], tokens: dict[str, str]) -> Resolve:
    """A resolver for a static token table (token -> user name, name -> user)."""

    def resolve(token: str) -> Any:
        for known, name in tokens.items():
            if token and hmac.compare_digest(token.encode(), known.encode()):
                return users.get(name)
        return None

    return resolve
