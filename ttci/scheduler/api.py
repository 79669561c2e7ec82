"""The scheduler's public HTTP API (CLI, CI plugins, admin page). Views parse, then delegate."""

from __future__ import annotations

import queue
import threading
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from ttci import __version__, admin
from ttci.errors import BadInput, TTError
from ttci.httpapi import API_VERSION, install_auth, install_errors, json_body, ndjson
from ttci.scheduler.envspec import EnvRequest, parse_duration
from ttci.scheduler.hostd_client import HostdError, HostUnreachable
from ttci.scheduler.placement import NoPlacement
from ttci.scheduler.service import EnvBusy, EnvExists, EnvNotFound, Scheduler, User

bp = Blueprint("scheduler", __name__, url_prefix="/v1")


def _s() -> Scheduler:
    s: Scheduler = current_app.config["SCHEDULER"]
    return s


def _user() -> User:
    users: dict[str, User] = current_app.config["USERS"]
    return users[request.environ["tt.user"]]


@bp.get("/status")
def status() -> Response:
    s, user = _s(), _user()
    hosts = s.hosts()
    envs = s.list_envs(user, limit=100_000)
    return jsonify(
        {
            "version": __version__,
            "api": API_VERSION,
            "user": user.name,
            "admin": user.admin,
            "hosts_up": sum(1 for h in hosts if h["state"] == "up"),
            "hosts": len(hosts),
            "envs": len(envs),
            "vms": sum(e["vm_count"] for e in envs),
        }
    )


@bp.get("/hosts")
def hosts() -> Response:
    return jsonify(_s().hosts())


@bp.get("/images")
def images() -> Response:
    return jsonify(_s().images())


@bp.get("/envs")
def list_envs() -> Response:
    try:
        offset = int(request.args.get("offset", 0))
        limit = min(int(request.args.get("limit", 1000)), 10_000)
    except ValueError:
        raise BadInput("offset and limit must be integers", hint="?offset=0&limit=100") from None
    return jsonify(_s().list_envs(_user(), offset, limit))


@bp.post("/envs")
def create_env() -> tuple[Response, int]:
    """Create an ENV; with ?progress=1 the answer is an NDJSON stream: one `vm` event per VM
    as it comes up, then `ready` (with the ENV) or `error`."""
    req, user = EnvRequest.from_dict(json_body()), _user()
    s = _s()
    if request.args.get("progress") not in ("1", "true"):
        return jsonify(s.create_env(req, user)), 201
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def work() -> None:
        try:
            env = s.create_env(req, user, progress=lambda ev: events.put({"event": "vm", **ev}))
            events.put({"event": "ready", "env": env})
        except TTError as e:
            status = (
                400
                if isinstance(e, BadInput)
                else 409
                if isinstance(e, EnvExists | NoPlacement | EnvBusy)
                else 500
            )
            events.put({"event": "error", "error": e.message, "hint": e.hint, "status": status})
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True).start()
    return ndjson(iter(events.get, None)), 201


@bp.get("/envs/<name>")
def show_env(name: str) -> Response:
    return jsonify(_s().show_env(name, _user()))


@bp.delete("/envs/<name>")
def delete_env(name: str) -> Response:
    return jsonify(_s().delete_env(name, _user()))


@bp.post("/envs/<name>/extend")
def extend_env(name: str) -> Response:
    """Body {"life_time": "1h"}: the ENV lives that long from now."""
    body = json_body()
    if "life_time" not in body:
        raise BadInput("life_time is missing", hint='send {"life_time": "1h"}')
    return jsonify(_s().extend_env(name, _user(), parse_duration(body["life_time"])))


@bp.post("/envs/<name>/run")
def run_env(name: str) -> Response:
    body = json_body()
    argv: Any
    if "cmd" in body:
        if not isinstance(body["cmd"], str) or not body["cmd"].strip():
            raise BadInput("cmd must be a non-empty string", hint="--cmd 'uname -a'")
        argv = ["/bin/sh", "-c", body["cmd"]]
    else:
        argv = body.get("argv")
    req: dict[str, Any] = {"argv": argv}
    for key in ("env", "cwd", "timeout", "stdin_b64"):
        if body.get(key) is not None:
            req[key] = body[key]
    s, user = _s(), _user()
    s.show_env(name, user)  # 404 before the stream starts
    return ndjson(s.run(name, user, req))


@bp.put("/envs/<name>/files")
def push(name: str) -> Response:
    dest = request.args.get("dest", "")
    if not dest.startswith("/"):
        raise BadInput(f"destination {dest!r} is not absolute", hint="e.g. /root/src")
    return jsonify(_s().push(name, _user(), dest, request.get_data()))


@bp.get("/envs/<name>/files")
def get(name: str) -> Response:
    path = request.args.get("path", "")
    if not path.startswith("/"):
        raise BadInput(f"path {path!r} is not absolute", hint="e.g. /etc/os-release")
    return jsonify(_s().get(name, _user(), path))


def create_app(scheduler: Scheduler, users: dict[str, User], tokens: dict[str, str]) -> Flask:
    """tokens: token -> user name; users: name -> User."""
    app = Flask("ttci.scheduler")
    app.config["SCHEDULER"] = scheduler
    app.config["USERS"] = users
    install_auth(app, tokens, open_paths=("/v1/health",))
    install_errors(
        app,
        {
            EnvNotFound: 404,
            EnvExists: 409,
            EnvBusy: 409,
            NoPlacement: 409,
            HostUnreachable: 503,
            HostdError: 502,
            BadInput: 400,
        },
    )
    app.register_blueprint(bp)
    resolve = admin.token_resolver(users, tokens)
    admin.mount(app, scheduler, current_user=_user, resolve=resolve)

    @app.get("/v1/health")
    def health() -> Response:
        return jsonify({"ok": True, "version": __version__})

    return app
