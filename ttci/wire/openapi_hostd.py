"""hostd's internal HTTP API (the scheduler is its only client) as an OpenAPI 3.1 description,
served at hostd's /v1/openapi.json. Pure.

Request schemas come from the wire shapes (ttci.wire.envs.VMRequest, ttci.wire.commands);
tests/test_openapi.py checks the description against hostd's Flask routes.
"""

from __future__ import annotations

from typing import Any

from ttci import __version__
from ttci.wire.envs import VM_ID_RE
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
    media,
    obj,
    operation,
    path_param,
    query_param,
)
from ttci.wire.openapi_caches import CACHE, COMMIT_CACHE, hostd_cache_paths
from ttci.wire.openapi_envs import EGRESS_RULES, exec_request_schema
from ttci.wire.openapi_images import hostd_image_paths

__all__ = ["hostd_openapi"]

_VM_ERRORS = (401, 404)


def _vm_request() -> Spec:
    return obj(
        ("env", "name", "image"),
        api=api_field(),
        id={"type": "string", "pattern": ecma(VM_ID_RE)},
        env={"type": "string", "maxLength": 100},
        name={"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
        owner={"type": "string", "maxLength": 100},
        image={"type": "string", "maxLength": 200},
        cpus={"type": "number", "minimum": 0.1, "maximum": 64},
        memory_mib={"type": "integer", "minimum": 128, "maximum": 262144},
        disk_gib={"type": "integer", "minimum": 0, "maximum": 4096},
        deny_outgoing={"type": "boolean"},
        ports={"type": "string"},
        allow_egress=EGRESS_RULES,
        egress_audit={"type": "boolean"},
        cold={"type": "boolean", "description": "true: boot cold even where a template is ready"},
        cache=CACHE,
        cache_project={"type": "string", "maxLength": 300},
    )


def _host_paths() -> dict[str, Spec]:
    vm = obj(("id", "state"), id=STR, env=STR, name=STR, state=STR)
    host = obj(
        ("host_id", "api", "total", "used", "free", "images"),
        host_id=STR,
        version=STR,
        api=INT,
        machine=STR,
        total={"type": "object"},
        used={"type": "object"},
        free={"type": "object"},
        vms=INT,
        images={"type": "array", "items": obj(("name",), name=STR, disk_gib=INT)},
        warm={"type": "object", "description": "templates, restore self-tests, hits, misses"},
    )
    return {
        **health_paths(),
        "/v1/health": {
            "get": operation(
                "health", "Alive.", {200: obj(("ok",), ok={"type": "boolean"})}, (), security=[]
            )
        },
        "/v1/openapi.json": {
            "get": operation(
                "openapi", "This description.", {200: {"type": "object"}}, (), security=[]
            )
        },
        "/metrics": {
            "get": operation(
                "prometheus", "Prometheus metrics.", {200: media(text=STR)}, (), security=[]
            )
        },
        "/v1/host": {"get": operation("host", "Capacity, use, images.", {200: host}, (401,))},
        "/v1/images": {
            "get": operation(
                "images",
                "The host's images.",
                {200: {"type": "array", "items": {"type": "object"}}},
                (401,),
            )
        },
        "/v1/vms": {
            "get": operation(
                "list_vms", "Every VM on this host.", {200: {"type": "array", "items": vm}}, (401,)
            ),
            "post": operation(
                "create_vm",
                "Boot a VM the scheduler placed here; answers once its agent is up.",
                {201: vm},
                (400, 401, 403, 404, 409, 413, 502, 503),
                body=json_body(_vm_request()),
            ),
        },
    }


def _template_paths() -> dict[str, Spec]:
    size = obj(
        ("image",),
        image={"type": "string", "maxLength": 200},
        cpus={"type": "number", "minimum": 0.1, "maximum": 64},
        memory_mib={"type": "integer", "minimum": 128, "maximum": 262144},
        disk_gib={"type": "integer", "minimum": 0, "maximum": 4096},
    )
    return {
        "/v1/templates": {
            "get": operation(
                "list_templates",
                "Snapshot templates, restore self-tests, warm hits and misses.",
                {200: {"type": "object"}},
                (401,),
            ),
            "post": operation(
                "make_template",
                "Make (or find) the template of an image and size; answers once it is ready.",
                {201: {"type": "object"}},
                (400, 401, 404, 409, 413, 502, 503),
                body=json_body(size),
            ),
        }
    }


def _vm_paths() -> dict[str, Spec]:
    vm_id = [path_param("vm_id", "the VM's id")]
    tar = {"type": "string", "format": "binary"}
    guest_path = {"type": "string", "pattern": "^/", "maxLength": 4096}
    return {
        "/v1/vms/{vm_id}": {
            "get": operation("get_vm", "One VM.", {200: {"type": "object"}}, _VM_ERRORS),
            "delete": operation(
                "delete_vm",
                "Destroy a VM (committing or discarding its cache clone).",
                {204: None},
                (400, *_VM_ERRORS, 503),
                params=(COMMIT_CACHE,),
            ),
            "parameters": vm_id,
        },
        "/v1/envs/{env}/egress": {
            "get": operation(
                "env_egress",
                "An ENV's egress on this host: mode, allow-list, resolver, denied flows.",
                {200: {"type": "object"}},
                _VM_ERRORS,
            ),
            "parameters": [path_param("env", "the ENV's name")],
        },
        "/v1/vms/{vm_id}/exec": {
            "post": operation(
                "exec_vm",
                "Run a command; its events as NDJSON (start, stdout/stderr, exit or error).",
                {200: media(ndjson={})},
                (400, 401, 403, 404, 410, 413, 502),
                body=json_body(exec_request_schema()),
            ),
            "parameters": vm_id,
        },
        "/v1/vms/{vm_id}/files": {
            "put": operation(
                "push",
                "Unpack a tar at ?dest= in the guest (created if missing).",
                {200: obj(("bytes", "dest"), bytes=NUM, dest=STR)},
                (400, 401, 404, 410, 413, 502),
                body={"required": False, "content": {"application/x-tar": {"schema": tar}}},
                params=(query_param("dest", "a guest path", guest_path, required=True),),
            ),
            "get": operation(
                "get",
                "A tar of ?path= in the guest.",
                {200: {"application/x-tar": tar}},
                (400, 401, 404, 410, 502),
                params=(query_param("path", "a guest path", guest_path, required=True),),
            ),
            "parameters": vm_id,
        },
    }


def hostd_openapi() -> dict[str, Any]:
    """The description (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TT CI hostd (internal)",
            "version": __version__,
            "description": "One host's VMs, driven by the scheduler. Errors: {error, hint, kind}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"hostdToken": []}],
        "paths": {
            **_host_paths(),
            **_template_paths(),
            **_vm_paths(),
            **hostd_image_paths(),
            **hostd_cache_paths(),
        },
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "hostdToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "hostd's --token (the scheduler sends it)",
                }
            },
        },
    }
