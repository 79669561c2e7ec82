"""The scheduler's HTTP API as an OpenAPI 3.1 description (served at /v1/openapi.json). Pure.

Request schemas are built from the wire shapes' own names and limits (ttci.wire.envs, .hosts,
.commands, .jobs, .queue); tests/test_openapi.py checks the description against the Flask
routes and tests/test_api_inputs.py fuzzes a running scheduler against it (schemathesis).
The admin page (/admin) and /metrics are separate apps, not part of this API.
"""

from __future__ import annotations

from typing import Any

from ttci import __version__
from ttci.wire.hosts import HOST_ID_RE, MAX_TOKEN
from ttci.wire.openapi import (
    ERROR,
    INT,
    NUM,
    STR,
    Spec,
    api_field,
    ecma,
    health_paths,
    json_body,
    obj,
    operation,
    path_param,
    ref,
)
from ttci.wire.openapi_caches import scheduler_cache_paths
from ttci.wire.openapi_envs import env_paths, env_request_schema, exec_request_schema
from ttci.wire.openapi_images import scheduler_image_paths
from ttci.wire.queue import BLOCKERS

__all__ = ["scheduler_openapi"]

_USER: list[dict[str, list[str]]] = [{"userToken": []}]
_ADMIN = "Admins only."


def _schemas() -> dict[str, Spec]:
    queue_info = obj(
        ("position", "blocked_by"),
        position=INT,
        blocked_by={"type": "string", "enum": list(BLOCKERS)},
        detail=STR,
        needs={"type": "object"},
        vms=INT,
        waited_s=NUM,
        reserved={"type": "boolean"},
    )
    vm = obj(
        ("name", "state"),
        name=STR,
        image=STR,
        arch=STR,
        host=STR,
        state=STR,
        cpus=NUM,
        memory_mib=INT,
        disk_gib=INT,
        ip=STR,
        ports={"type": "array"},
    )
    env = obj(
        ("name", "owner", "state"),
        name=STR,
        owner=STR,
        os_prefix=STR,
        state=STR,
        created_at=STR,
        origin={"type": "object"},
        vm_count=INT,
        lost=INT,
        queue=ref("QueueInfo"),
        vms={"type": "array", "items": ref("Vm")},
    )
    return {
        "Error": ERROR,
        "EnvRequest": env_request_schema(),
        "ExecRequest": exec_request_schema(),
        "Env": env,
        "Vm": vm,
        "QueueInfo": queue_info,
        "Host": obj(("id", "state"), id=STR, kind=STR, state=STR, drained={"type": "boolean"}),
        "JoinAnswer": obj(("id", "heartbeat_s"), id=STR, heartbeat_s=NUM, report_error=STR),
        "Quota": obj(
            (),
            vms={"type": ["integer", "null"]},
            cpus={"type": ["number", "null"]},
            priority={"type": ["integer", "null"]},
        ),
        "Job": obj(("env", "result"), env=STR, owner=STR, origin={"type": "object"}),
    }


def _join_paths() -> dict[str, Spec]:
    registration = obj(
        ("api", "id", "url", "token"),
        api=api_field(),
        id={"type": "string", "pattern": ecma(HOST_ID_RE)},
        url={"type": "string", "pattern": r"^https?://[A-Za-z0-9.\-\[\]:]{1,255}:[0-9]{1,5}$"},
        token={"type": "string", "minLength": 16, "maxLength": MAX_TOKEN},
        current_token={"type": "string", "maxLength": MAX_TOKEN},
        info={"type": "object", "description": "hostd's GET /v1/host"},
    )
    beat = obj(
        ("id", "info"),
        api=api_field(),
        id=registration["properties"]["id"],
        info={"type": "object"},
    )
    return {
        "/v1/hosts/register": {
            "post": operation(
                "register_host",
                "A hostd joins the pool (bearing the join token).",
                {200: ref("JoinAnswer")},
                (400, 403, 409, 413),
                body=json_body(registration),
                security=[{"joinToken": []}],
            )
        },
        "/v1/hosts/heartbeat": {
            "post": operation(
                "heartbeat",
                "A registered hostd's report (bearing its own token).",
                {200: ref("JoinAnswer")},
                (400, 403, 404, 413),
                body=json_body(beat),
                security=[{"hostToken": []}],
            )
        },
    }


def _host_paths() -> dict[str, Spec]:
    host_id = path_param("host_id", "the host's id")
    drained = operation(
        "drain", "Place nothing new on the host. " + _ADMIN, {200: ref("Host")}, (401, 403, 404)
    )
    return {
        "/v1/hosts": {
            "get": operation(
                "hosts",
                "The pool (addresses only for admins).",
                {200: {"type": "array", "items": ref("Host")}},
                (401,),
            )
        },
        "/v1/hosts/{host_id}/drain": {"post": drained, "parameters": [host_id]},
        "/v1/hosts/{host_id}/undrain": {
            "post": {
                **drained,
                "operationId": "undrain",
                "summary": "Place VMs on it again. " + _ADMIN,
            },
            "parameters": [host_id],
        },
        "/v1/hosts/{host_id}": {
            "delete": operation(
                "forget_host",
                "Forget a registered host. " + _ADMIN,
                {200: obj(("id", "forgotten"), id=STR, forgotten={"type": "boolean"})},
                (401, 403, 404),
            ),
            "parameters": [host_id],
        },
    }


def _user_paths() -> dict[str, Spec]:
    user = obj(("name", "admin"), name=STR, admin={"type": "boolean"})
    new_user = obj(
        ("name",),
        name={"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"},
        admin={"type": "boolean"},
    )
    return {
        "/v1/users": {
            "get": operation(
                "list_users",
                "Every user. " + _ADMIN,
                {200: {"type": "array", "items": user}},
                (401, 403),
            ),
            "post": operation(
                "add_user",
                "Make a user; its token is in the answer, once. " + _ADMIN,
                {
                    201: obj(
                        ("name", "admin", "token"), name=STR, admin={"type": "boolean"}, token=STR
                    )
                },
                (400, 401, 403, 409, 413),
                body=json_body(new_user),
            ),
        },
        "/v1/users/{name}": {
            "delete": operation(
                "delete_user",
                "Remove a user. " + _ADMIN,
                {200: obj(("name", "deleted"), name=STR, deleted={"type": "boolean"})},
                (401, 403, 404),
            ),
            "parameters": [path_param("name", "the user's name")],
        },
    }


def _quota_paths() -> dict[str, Spec]:
    quota = obj(
        ("scope", "name"),
        scope={"type": "string", "enum": ["user", "project", "kind"]},
        name={"type": "string", "minLength": 1, "maxLength": 200},
        vms={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1_000_000}, {"type": "null"}]},
        cpus={"anyOf": [{"type": "number", "minimum": 0, "maximum": 100_000}, {"type": "null"}]},
        priority={
            "anyOf": [{"type": "integer", "minimum": -1000, "maximum": 1000}, {"type": "null"}]
        },
    )
    return {
        "/v1/quotas": {
            "get": operation(
                "list_quotas",
                "Quotas per user, project and kind. " + _ADMIN,
                {200: {"type": "object"}},
                (401, 403),
            ),
            "put": operation(
                "set_quota",
                "Set caps and priority (null: no cap). " + _ADMIN,
                {200: obj(("scope", "name"), scope=STR, name=STR)},
                (400, 401, 403, 413),
                body=json_body(quota),
            ),
        },
        "/v1/quotas/{scope}/{name}": {
            "delete": operation(
                "delete_quota",
                "Back to the defaults. " + _ADMIN,
                {
                    200: obj(
                        ("scope", "name", "deleted"),
                        scope=STR,
                        name=STR,
                        deleted={"type": "boolean"},
                    )
                },
                (401, 403, 404),
            ),
            "parameters": [
                path_param("scope", "user, project or kind"),
                path_param("name", "whose quota"),
            ],
        },
    }


def _misc_paths() -> dict[str, Spec]:
    status = obj(
        ("version", "api", "user", "admin"),
        version=STR,
        api=INT,
        user=STR,
        admin={"type": "boolean"},
        hosts=INT,
        hosts_up=INT,
        envs=INT,
        vms=INT,
    )
    return {
        **health_paths(),
        "/v1/health": {
            "get": operation(
                "health",
                "Alive.",
                {200: obj(("ok",), ok={"type": "boolean"}, version=STR)},
                (),
                security=[],
            )
        },
        "/v1/openapi.json": {
            "get": operation(
                "openapi", "This description.", {200: {"type": "object"}}, (), security=[]
            )
        },
        "/v1/status": {"get": operation("status", "Who you are; counts.", {200: status}, (401,))},
        "/v1/images": {
            "get": operation(
                "images",
                "Images of the up hosts.",
                {
                    200: {
                        "type": "array",
                        "items": obj(
                            ("name", "hosts"), name=STR, hosts={"type": "array", "items": STR}
                        ),
                    }
                },
                (401,),
            )
        },
    }


def scheduler_openapi() -> dict[str, Any]:
    """The description (a fresh dict each call)."""
    paths = {
        **_misc_paths(),
        **_join_paths(),
        **_host_paths(),
        **_user_paths(),
        **_quota_paths(),
        **env_paths(),
        **scheduler_image_paths(),
        **scheduler_cache_paths(),
    }
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TT CI scheduler",
            "version": __version__,
            "description": "ENVs of fresh VMs for CI; see README.md. Errors: {error, hint, kind}.",
        },
        "servers": [{"url": "/"}],
        "security": _USER,
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "userToken": {**bearer, "description": "a user's token (tt user add)"},
                "joinToken": {**bearer, "description": "the pool's join token"},
                "hostToken": {**bearer, "description": "the token the host registered with"},
            },
        },
    }
