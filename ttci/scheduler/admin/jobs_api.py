"""Job outcomes for the history: `POST /v1/envs/<name>/result` and `GET /v1/jobs`.

Registered on the scheduler's API app, so its bearer-token auth applies: a job's owner (the CI
plugin or `tt job run` that made the ENV) or an admin may report its result.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from ttci.infra.http_server import error_response, json_body, query_int
from ttci.scheduler import history
from ttci.wire.jobs import JobResult

__all__ = ["bp", "jobs", "report_result"]

bp = Blueprint("jobs", __name__, url_prefix="/v1")


def _user() -> Any:
    return current_app.config["JOBS_CURRENT_USER"]()


@bp.post("/envs/<name>/result")
def report_result(name: str) -> Response:
    """Body {"result": "success|failed|cancelled|error"}; the ENV may be deleted already."""
    result = JobResult.from_dict(json_body())
    user, store = _user(), current_app.config["SCHEDULER"].store
    try:
        return jsonify(history.report_result(store, name, user.name, user.admin, result))
    except history.JobNotFound as e:
        return error_response(404, e.message, e.hint)


@bp.get("/jobs")
def jobs() -> Response:
    """The newest jobs first (yours; an admin sees everyone's). ?limit=N (default 50)."""
    limit = min(query_int("limit", 50, 1, 1 << 31), 1000)
    user = _user()
    store = current_app.config["SCHEDULER"].store
    return jsonify(history.recent(store, limit, owner=None if user.admin else user.name))
