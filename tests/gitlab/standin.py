"""A loopback stand-in for the parts of GitLab's REST API that `tt gitlab register` uses.

Built from GitLab's documentation, and strict: every request is checked against it and
anything else is recorded as a violation (the test asserts there are none).

- `GET /api/v4/user` (doc/api/users.md, "Get the current user"): needs a valid `PRIVATE-TOKEN`
  header; 401 `{"message": "401 Unauthorized"}` otherwise.
- `POST /api/v4/user/runners` (doc/api/users.md, "Create a runner linked to a user"):
  `runner_type` (required: instance_type, group_type, project_type); `group_id` required for
  group_type, `project_id` for project_type; optional `description`, `paused`, `locked`,
  `run_untagged`, `tag_list` (string array), `access_level` (not_protected, ref_protected),
  `maximum_timeout`, `maintenance_note`. 201 `{"id", "token": "glrt-...", "token_expires_at"}`.
  Instance runners need an administrator (403 otherwise); 400 on a bad attribute.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

RUNNER_TYPES = ("instance_type", "group_type", "project_type")
ATTRS: dict[str, type | tuple[type, ...]] = {
    "runner_type": str,
    "group_id": int,
    "project_id": int,
    "description": str,
    "paused": bool,
    "locked": bool,
    "run_untagged": bool,
    "tag_list": list,
    "access_level": str,
    "maximum_timeout": int,
    "maintenance_note": str,
}


@dataclass
class Standin:
    tokens: dict[str, bool]  # token -> admin
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    runners: list[dict[str, Any]] = field(default_factory=list)


def _validate_runner(body: dict[str, Any]) -> str | None:
    for k, v in body.items():
        if k not in ATTRS:
            return f"{k} does not exist"
        want = ATTRS[k]
        if want is int and (isinstance(v, bool) or not isinstance(v, int)):
            return f"{k} is invalid"
        if not isinstance(v, want):
            return f"{k} is invalid"
    rt = body.get("runner_type")
    if rt not in RUNNER_TYPES:
        return "runner_type is missing, runner_type does not have a valid value"
    if rt == "group_type" and "group_id" not in body:
        return "group_id is missing"
    if rt == "project_type" and "project_id" not in body:
        return "project_id is missing"
    if (rt != "group_type" and "group_id" in body) or (
        rt != "project_type" and "project_id" in body
    ):
        return "group_id and project_id are mutually exclusive with the runner_type"
    if "tag_list" in body and not all(isinstance(t, str) for t in body["tag_list"]):
        return "tag_list is invalid"
    if body.get("access_level") not in (None, "not_protected", "ref_protected"):
        return "access_level does not have a valid value"
    return None


def create_app(st: Standin) -> Flask:
    app = Flask("gitlab-standin")
    ids = itertools.count(9171)

    def who() -> bool | None:
        return st.tokens.get(request.headers.get("PRIVATE-TOKEN", ""))

    @app.before_request
    def record() -> None:
        body = request.get_json(silent=True) if request.data else None
        st.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "token": request.headers.get("PRIVATE-TOKEN"),
                "content_type": request.content_type,
                "json": body,
            }
        )

    @app.get("/api/v4/user")
    def user() -> Any:
        admin = who()
        if admin is None:
            return jsonify({"message": "401 Unauthorized"}), 401
        return jsonify({"id": 1, "username": "root" if admin else "dev", "is_admin": admin})

    @app.post("/api/v4/user/runners")
    def create_runner() -> Any:
        admin = who()
        if admin is None:
            return jsonify({"message": "401 Unauthorized"}), 401
        if request.mimetype != "application/json":
            st.violations.append(f"POST /user/runners sent {request.mimetype}, not JSON")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            st.violations.append("POST /user/runners without a JSON object body")
            return jsonify({"error": "runner_type is missing"}), 400
        problem = _validate_runner(body)
        if problem:
            st.violations.append(f"POST /user/runners: {problem}")
            return jsonify({"error": problem}), 400
        if body["runner_type"] == "instance_type" and not admin:
            return jsonify({"message": "403 Forbidden"}), 403
        if body.get("project_id") == 404 or body.get("group_id") == 404:
            return jsonify({"message": "404 Project Not Found"}), 404
        runner = {"id": next(ids), "token": "glrt-" + secrets.token_urlsafe(15)}
        st.runners.append({**body, **runner})
        return jsonify({**runner, "token_expires_at": None}), 201

    @app.errorhandler(404)
    def unknown(e: Exception) -> Any:
        st.violations.append(f"{request.method} {request.path} is not an endpoint we expect")
        return jsonify({"message": "404 Not Found"}), 404

    @app.errorhandler(405)
    def wrong_method(e: Exception) -> Any:
        st.violations.append(f"{request.method} {request.path}: wrong method")
        return jsonify({"message": "405 Method Not Allowed"}), 405

    return app


@contextmanager
def serving(tokens: dict[str, bool]) -> Iterator[Standin]:
    """Serve the stand-in on 127.0.0.1 (a free port) in a thread."""
    st = Standin(tokens)
    server = make_server("127.0.0.1", 0, create_app(st), threaded=True)
    st.url = f"http://127.0.0.1:{server.server_port}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield st
    finally:
        server.shutdown()
        t.join(timeout=5)
        server.server_close()
