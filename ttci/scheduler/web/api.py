"""The scheduler's public HTTP API (CLI, CI plugins, admin page). Views parse, then delegate."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from ttci import __version__
from ttci.infra.health import HEALTH_ROUTES, install_health
from ttci.infra.http_server import (
    bearer_ok,
    bearer_token,
    install_auth,
    install_errors,
    json_body,
    ndjson,
    query_bool,
    query_int,
    read_body,
)
from ttci.infra.sql import DatabaseUnavailable
from ttci.model.errors import BadInput, TTError
from ttci.scheduler import admin
from ttci.scheduler import admission_store as qs
from ttci.scheduler.caches import CacheNotFound
from ttci.scheduler.env_queue import QueuedRefused, QueueTimeout
from ttci.scheduler.hostd_client import HostdError, HostUnreachable
from ttci.scheduler.hosts import HostClaimed, HostNotFound, HostRefused
from ttci.scheduler.planning.placement import NoPlacement
from ttci.scheduler.service import EnvBusy, EnvExists, EnvNotFound, Scheduler
from ttci.scheduler.users import NameReserved, User, UserExists, UserNotFound
from ttci.scheduler.web import images_api
from ttci.scheduler.web.fast_reads import MAX_LIMIT, MAX_OFFSET, FastReads
from ttci.scheduler.web.health import scheduler_checks
from ttci.wire.commands import ExecRequest
from ttci.wire.envs import EnvEvent, EnvRequest, parse_duration
from ttci.wire.hosts import Heartbeat, HostRegistration
from ttci.wire.openapi_scheduler import scheduler_openapi
from ttci.wire.queue import WaitOptions

__all__ = [
    "Forbidden",
    "add_user",
    "bp",
    "create_app",
    "create_env",
    "delete_env",
    "delete_quota",
    "delete_user",
    "drain",
    "env_progress",
    "env_vms",
    "extend_env",
    "forget_host",
    "get",
    "heartbeat",
    "hosts",
    "images",
    "list_envs",
    "list_queue",
    "list_quotas",
    "list_users",
    "push",
    "register_host",
    "run_env",
    "set_quota",
    "show_env",
    "status",
    "undrain",
]

bp = Blueprint("scheduler", __name__, url_prefix="/v1")
MAX_PUSH_BYTES = 1 << 30  # a push's tar, a get's per VM (waitress takes no larger body either)
# The only routes without a user's token (the host routes check the join token themselves).
OPEN_ROUTES = (
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/hosts/register"),
    ("POST", "/v1/hosts/heartbeat"),
    *HEALTH_ROUTES,
)


def _s() -> Scheduler:
    s: Scheduler = current_app.config["SCHEDULER"]
    return s


def _user() -> User:
    user: User = request.environ["tt.user"]
    return user


def _admin() -> User:
    user = _user()
    if not user.admin:
        raise Forbidden(f"user {user.name} is not an admin", hint="ask an admin to do it")
    return user


class Forbidden(TTError):
    """The user may not do this."""


def _join_check(*, join_token: bool = True) -> None:
    """Registrations carry the pool's join token (heartbeats their host's own token)."""
    if not _s().pool.join_token:
        raise HostRefused(
            "this scheduler takes no registrations", hint="start tt-scheduler with --join-token"
        )
    if join_token and not bearer_ok(_s().pool.join_token):
        raise HostRefused("wrong join token", hint="pass the scheduler's --join-token to hostd")


@bp.post("/hosts/register")
def register_host() -> Response:
    """A hostd joins (bearing the join token); an id already registered needs its host's own
    token too (hosts.HostPool.register)."""
    _join_check()
    return jsonify(_s().pool.register(HostRegistration.from_dict(json_body())).to_dict())


@bp.post("/hosts/heartbeat")
def heartbeat() -> Response:
    """A registered hostd's report, bearing its own token (the one it registered with)."""
    _join_check(join_token=False)
    beat = Heartbeat.from_dict(json_body())
    return jsonify(_s().pool.heartbeat(beat, bearer_token()).to_dict())


@bp.post("/hosts/<host_id>/drain")
def drain(host_id: str) -> Response:
    _admin()
    return jsonify(_s().set_drain(host_id, True))


@bp.post("/hosts/<host_id>/undrain")
def undrain(host_id: str) -> Response:
    _admin()
    return jsonify(_s().set_drain(host_id, False))


@bp.delete("/hosts/<host_id>")
def forget_host(host_id: str) -> Response:
    _admin()
    _s().pool.forget(host_id)
    return jsonify({"id": host_id, "forgotten": True})


@bp.get("/users")
def list_users() -> Response:
    _admin()
    return jsonify(_s().users.list())


@bp.post("/users")
def add_user() -> tuple[Response, int]:
    _admin()
    body = json_body()
    name, admin_flag = body.get("name", ""), body.get("admin", False)
    if not isinstance(name, str):
        raise BadInput(f"user name {name!r} is not a string", hint='{"name": "alice"}')
    if not isinstance(admin_flag, bool):
        raise BadInput(f"admin {admin_flag!r} is not true or false", hint='{"admin": true}')
    service = body.get("service", "")
    if not isinstance(service, str):
        raise BadInput("service must be a string", hint='{"service": "gitlab"}')
    return jsonify(_s().users.add(name, admin_flag, service)), 201


@bp.delete("/users/<name>")
def delete_user(name: str) -> Response:
    _admin()
    _s().users.delete(name)
    return jsonify({"name": name, "deleted": True})


@bp.get("/status")
def status() -> Response:
    return jsonify(_s().status(_user()))


@bp.get("/hosts")
def hosts() -> Response:
    """The pool; host addresses only for admins."""
    body = _s().pool.public_body(_user().admin, current_app.json.dumps)
    return Response(body, mimetype="application/json")


@bp.get("/images")
def images() -> Response:
    return jsonify(_s().images())


@bp.get("/envs")
def list_envs() -> Response:
    offset, limit = _page()
    return jsonify(_s().list_envs(_user(), offset, limit))


@bp.post("/envs")
def create_env() -> tuple[Response, int]:
    """Create an ENV. It waits in the admission queue while the cloud is busy (unless the body
    says "wait": false; "max_wait" bounds the wait). With ?progress=1 the answer is an NDJSON
    stream: `queued` (its position, when it changes), `granted`, one `vm` event per VM as it
    comes up, then `ready` (with the ENV) or `error`; closing the stream while the ENV is still
    queued takes it out of the queue."""
    body = json_body()
    req, opts, user = EnvRequest.from_dict(body), WaitOptions.from_dict(body), _user()
    s = _s()
    if request.args.get("dry_run") in ("1", "true"):
        return jsonify(s.plan_env(req)), 200
    if request.args.get("progress") not in ("1", "true"):
        return jsonify(s.create_env(req, user, opts=opts)), 201
    # Refusals are plain HTTP errors, raised before the stream starts.
    events = s.submit_and_watch(req, user, opts)
    return ndjson(_watch_then_cancel(s, req.name, user, events)), 201


def _watch_then_cancel(
    s: Scheduler, name: str, user: User, events: Iterator[EnvEvent]
) -> Iterator[dict[str, Any]]:
    done = False
    try:
        for ev in events:
            done = ev.final
            yield ev.to_dict()
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # unsubscribe now, not when the garbage collector gets to it
        if not done:  # the client left (Ctrl-C, a cancelled CI job): no request stays queued
            with contextlib.suppress(TTError):
                s.cancel_queued(name, user)


@bp.get("/envs/<name>/progress")
def env_progress(name: str) -> Response:
    """Follow an ENV being queued or created (again, e.g. after a broken stream): the same
    NDJSON events as POST /v1/envs?progress=1, ending with `ready` or `error`."""
    s, user = _s(), _user()
    s.show_env(name, user, vms=False)  # 404 before the stream starts
    return ndjson(ev.to_dict() for ev in s.watch_env(name, user))


@bp.get("/queue")
def list_queue() -> Response:
    """The waiting ENV requests in line order, with what each needs and what blocks it."""
    return jsonify(_s().list_queue(_user()))


@bp.get("/quotas")
def list_quotas() -> Response:
    _admin()
    return jsonify(qs.load_quotas(_s().store).to_dict())


@bp.put("/quotas")
def set_quota() -> Response:
    """Set a user's, project's or origin kind's caps and priority (admin)."""
    _admin()
    scope, name, quota = qs.parse_quota(json_body())
    qs.set_quota(_s().store, scope, name, quota)
    _s().wake_dispatch()
    return jsonify({"scope": scope, "name": name, **quota.to_dict()})


@bp.delete("/quotas/<scope>/<path:name>")
def delete_quota(scope: str, name: str) -> Response:
    _admin()
    if not qs.remove_quota(_s().store, scope, name):
        raise EnvNotFound(f"no quota for {scope} {name!r}", hint="see GET /v1/quotas")
    _s().wake_dispatch()
    return jsonify({"scope": scope, "name": name, "deleted": True})


def _page() -> tuple[int, int]:
    """?offset= (0..MAX_OFFSET) and ?limit= (1..; more than MAX_LIMIT reads as MAX_LIMIT)."""
    offset = query_int("offset", 0, 0, MAX_OFFSET)
    return offset, min(query_int("limit", 1000, 1, MAX_OFFSET), MAX_LIMIT)


def _guest_path(key: str, hint: str) -> str:
    """An absolute path in the guests from the query string (?dest=, ?path=)."""
    path = request.args.get(key, "")
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise BadInput(f"{key} {path[:100]!r} is not an absolute path", hint=hint)
    return path


@bp.get("/envs/<name>/vms")
def env_vms(name: str) -> Response:
    """The ENV's VMs a page at a time (?offset=&limit=), or all as NDJSON (?stream=1)."""
    s, user = _s(), _user()
    if request.args.get("stream") in ("1", "true"):
        s.show_env(name, user, vms=False)
        return ndjson(s.iter_vms(name, user))
    offset, limit = _page()
    body = s.page_vms_body(name, user, offset, limit, current_app.json.dumps)
    return Response(body, mimetype="application/json")


@bp.get("/envs/<name>")
def show_env(name: str) -> Response:
    return jsonify(_s().show_env(name, _user()))


@bp.delete("/envs/<name>")
def delete_env(name: str) -> Response:
    """?commit_cache=1: the job succeeded; its cache clones become the newest versions."""
    commit = query_bool("commit_cache")
    return jsonify(_s().delete_env(name, _user(), commit_cache=commit))


@bp.get("/caches")
def list_caches() -> Response:
    """The pool's cache volumes: the caller's own (an admin: all), merged over the hosts."""
    return jsonify(_s().list_caches(_user()))


@bp.delete("/caches/<key>")
def delete_cache(key: str) -> Response:
    """?project= (a CI project's cache; default the caller's own) &owner= (admins)."""
    a = request.args
    return jsonify(_s().delete_cache(_user(), key, a.get("project", ""), a.get("owner", "")))


@bp.post("/envs/<name>/extend")
def extend_env(name: str) -> Response:
    """Body {"life_time": "1h"}: the ENV lives that long from now."""
    body = json_body()
    if "life_time" not in body:
        raise BadInput("life_time is missing", hint='send {"life_time": "1h"}')
    return jsonify(_s().extend_env(name, _user(), parse_duration(body["life_time"])))


@bp.post("/envs/<name>/run")
def run_env(name: str) -> Response:
    """Body: an ExecRequest; the answer: its ExecEvents as NDJSON, each tagged with its VM."""
    s, user = _s(), _user()
    s.show_env(name, user, vms=False)  # 404 before the body is read and the stream starts
    req = ExecRequest.from_dict(json_body())
    events = s.exec(name, user, req)
    first = next(events, None)  # bad input (an unknown VM) is a 400, not a broken stream
    return ndjson(ev.to_dict() for ev in itertools.chain([first] if first else [], events))


@bp.put("/envs/<name>/files")
def push(name: str) -> Response:
    """Body: a tar stream (at most MAX_PUSH_BYTES), unpacked at ?dest= in each VM. Whose ENV it
    is, and the size the request announces, are checked before a byte of the body is read."""
    s, user = _s(), _user()
    s.show_env(name, user, vms=False)
    dest = _guest_path("dest", "e.g. /root/src")
    return jsonify(s.push(name, user, dest, read_body(current_app.config["MAX_PUSH_BYTES"])))


@bp.get("/envs/<name>/files")
def get(name: str) -> Response:
    path = _guest_path("path", "e.g. /etc/os-release")
    return jsonify(_s().get(name, _user(), path, current_app.config["MAX_GET_BYTES"]))


def create_app(scheduler: Scheduler, max_files: int = MAX_PUSH_BYTES) -> Flask:
    """Users authenticate with their bearer tokens (scheduler.users); hosts with the join token.
    max_files: the largest tar a push, or one VM's get, moves (--max-files)."""
    app = Flask("ttci.scheduler")
    app.config["SCHEDULER"] = scheduler
    app.config["MAX_PUSH_BYTES"] = app.config["MAX_GET_BYTES"] = max_files
    install_auth(
        app,
        scheduler.users.resolve,
        open_routes=OPEN_ROUTES + images_api.OPEN_ROUTES,
    )
    install_errors(
        app,
        {
            EnvNotFound: 404,
            CacheNotFound: 404,
            EnvExists: 409,
            EnvBusy: 409,
            NoPlacement: 409,
            QueuedRefused: 409,
            QueueTimeout: 408,
            HostNotFound: 404,
            HostClaimed: 409,
            HostRefused: 403,
            Forbidden: 403,
            NameReserved: 403,
            UserExists: 409,
            UserNotFound: 404,
            HostUnreachable: 503,
            DatabaseUnavailable: 503,  # retryable: a failover (docs/operator/database.md)
            HostdError: 502,
            BadInput: 400,
        },
    )
    app.register_blueprint(bp)
    app.register_blueprint(images_api.bp)
    admin.mount(app, scheduler, current_user=_user, resolve=scheduler.users.resolve)

    install_health(app, "tt-scheduler", scheduler_checks(scheduler))  # /healthz, /readyz

    @app.get("/v1/health")
    def health() -> Response:
        return jsonify({"ok": True, "version": __version__})

    description = scheduler_openapi()

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        """This API as an OpenAPI 3.1 description (open, like /v1/health)."""
        return jsonify(description)

    app.wsgi_app = FastReads(app, scheduler)  # type: ignore[method-assign]
    return app
