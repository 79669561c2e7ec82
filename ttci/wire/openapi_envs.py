"""The ENV routes of the scheduler's OpenAPI description (openapi_scheduler.py). Pure.

The ENV and exec request schemas come from the wire shapes' own names and limits
(ttci.wire.envs, .commands, .queue, .jobs).
"""

from __future__ import annotations

from ttci.model.egress import MAX_EGRESS_RULES
from ttci.wire.commands import MAX_TIMEOUT_S
from ttci.wire.envs import ENV_NAME_RE, MAX_VMS, ORIGIN_KEYS, ORIGIN_KINDS
from ttci.wire.jobs import RESULTS
from ttci.wire.openapi import (
    INT,
    STR,
    Spec,
    api_field,
    ecma,
    json_body,
    media,
    obj,
    operation,
    path_param,
    query_param,
    ref,
)
from ttci.wire.openapi_caches import CACHE, COMMIT_CACHE
from ttci.wire.queue import MAX_WAIT_S

__all__ = [
    "EGRESS_RULES",
    "MAX_LIFE_S",
    "env_paths",
    "env_request_schema",
    "exec_request_schema",
]

MAX_LIFE_S = 30 * 86400  # parse_duration's limit
_DURATION_TEXT: Spec = {"type": "string", "pattern": r"^\s*[0-9]{1,12}\s*[smhdSMHD]?\s*$"}
_LIFE: Spec = {"anyOf": [{"type": "number", "minimum": 10, "maximum": MAX_LIFE_S}, _DURATION_TEXT]}
_RULE: Spec = {"type": "string", "minLength": 1, "maxLength": 300}
# ttci.model.egress: NAME, *.NAME or A.B.C.D[/LEN], each with an optional :PORT
EGRESS_RULES: Spec = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": _RULE, "maxItems": MAX_EGRESS_RULES}],
    "description": "egress allow-list: a list of rules, or one comma-separated text",
}


def _origin() -> Spec:
    props: dict[str, Spec] = {
        key: {"anyOf": [{"type": "string", "maxLength": n}, INT]}
        for key, n in ORIGIN_KEYS.items()
        if key not in ("kind", "url")
    }
    props["kind"] = {"type": "string", "enum": list(ORIGIN_KINDS)}
    props["url"] = {"type": "string", "maxLength": ORIGIN_KEYS["url"], "pattern": r"^https?://\S+$"}
    return {"type": "object", "properties": props, "additionalProperties": False}


def env_request_schema() -> Spec:
    spec = obj(
        ("name", "os_prefix"),
        api=api_field(),
        name={"type": "string", "pattern": ecma(ENV_NAME_RE)},
        os_prefix={"type": "string", "minLength": 1, "maxLength": 1000, "pattern": "[^,]"},
        cpus={"type": "number", "minimum": 0.1, "maximum": 64},
        memory_mib={"type": "integer", "minimum": 128, "maximum": 262144},
        disk_gib={"type": "integer", "minimum": 0, "maximum": 4096},
        dup_each={"type": "integer", "minimum": 1, "maximum": MAX_VMS},
        life_time={
            "anyOf": [{"type": "number", "minimum": 10, "maximum": MAX_LIFE_S}, _DURATION_TEXT]
        },
        deny_outgoing={"type": "boolean"},
        allow_egress=EGRESS_RULES,
        egress_audit={"type": "boolean"},
        cold={
            "type": "boolean",
            "description": "true: every VM boots cold, not warm from a snapshot",
        },
        cache=CACHE,
        vm_ports={
            "anyOf": [
                STR,
                {
                    "type": "array",
                    "items": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, STR]},
                },
            ]
        },
        origin=_origin(),
        wait={"type": "boolean", "description": "false: refused at once when it cannot start"},
        max_wait={"anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}, STR]},
    )
    spec["description"] = "An ENV request (ttci.wire.envs.EnvRequest) and its wait options."
    return spec


def exec_request_schema() -> Spec:
    return obj(
        (),
        api=api_field(),
        argv={"type": "array", "minItems": 1, "items": STR},
        cmd={"type": "string", "pattern": r"\S"},
        env={"type": "object", "additionalProperties": STR},
        cwd={"type": "string", "pattern": "^/"},
        stdin_b64={"type": "string", "contentEncoding": "base64"},
        timeout={"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
        vms={"type": "array", "items": STR},
    )


def _page_params() -> tuple[Spec, ...]:
    return (
        query_param(
            "offset", "skip this many", {"type": "integer", "minimum": 0, "maximum": 1 << 31}
        ),
        query_param(
            "limit",
            "at most this many (10,000 at most)",
            {"type": "integer", "minimum": 1, "maximum": 1 << 31},
        ),
    )


def _collection_paths() -> dict[str, Spec]:
    flag = {"type": "string", "enum": ["1", "true"]}
    plan = obj(("name", "vm_count", "hosts"), name=STR, vm_count=INT, hosts={"type": "object"})
    return {
        "/v1/envs": {
            "get": operation(
                "list_envs",
                "Your ENVs (an admin's: all), a page at a time.",
                {200: {"type": "array", "items": ref("Env")}},
                (400, 401),
                params=_page_params(),
            ),
            "post": operation(
                "create_env",
                "Create an ENV; it waits in the admission queue unless wait is false.",
                {200: plan, 201: media(json=ref("Env"), ndjson={})},
                (400, 401, 403, 408, 409, 413, 502, 503),
                body=json_body(ref("EnvRequest")),
                params=(
                    query_param("dry_run", "1: where it would go, nothing made", flag),
                    query_param("progress", "1: an NDJSON stream of its progress", flag),
                ),
            ),
        },
        "/v1/queue": {
            "get": operation(
                "list_queue",
                "Waiting ENV requests in line order.",
                {200: {"type": "array", "items": {"type": "object"}}},
                (401,),
            )
        },
        "/v1/jobs": {
            "get": operation(
                "jobs",
                "The newest jobs first (yours; an admin's: all).",
                {200: {"type": "array", "items": {"type": "object"}}},
                (400, 401),
                params=(
                    query_param(
                        "limit",
                        "at most this many (1,000 at most)",
                        {"type": "integer", "minimum": 1, "maximum": 1 << 31},
                    ),
                ),
            )
        },
    }


def _env_item_paths() -> dict[str, Spec]:
    name = [path_param("name", "the ENV's name")]
    page = obj(
        ("env", "total", "vms"),
        env=STR,
        total=INT,
        offset=INT,
        vms={"type": "array", "items": ref("Vm")},
    )
    return {
        "/v1/envs/{name}": {
            "get": operation("show_env", "An ENV with its VMs.", {200: ref("Env")}, (401, 404)),
            "delete": operation(
                "delete_env",
                "Delete an ENV (or take it out of the queue).",
                {200: {"type": "object"}},
                (400, 401, 404, 409, 502, 503),
                params=(COMMIT_CACHE,),
            ),
            "parameters": name,
        },
        "/v1/envs/{name}/progress": {
            "get": operation(
                "env_progress",
                "Follow an ENV being queued or created (NDJSON).",
                {200: media(ndjson={})},
                (401, 404),
            ),
            "parameters": name,
        },
        "/v1/envs/{name}/vms": {
            "get": operation(
                "env_vms",
                "The ENV's VMs a page at a time, or all as NDJSON (?stream=1).",
                {200: media(json=page, ndjson={})},
                (400, 401, 404),
                params=(
                    *_page_params(),
                    query_param("stream", "1: all as NDJSON", {"type": "string"}),
                ),
            ),
            "parameters": name,
        },
        "/v1/envs/{name}/extend": {
            "post": operation(
                "extend_env",
                "The ENV lives life_time from now.",
                {200: ref("Env")},
                (400, 401, 403, 404, 409, 413),
                body=json_body(
                    obj(
                        ("life_time",),
                        life_time=_LIFE,
                    )
                ),
            ),
            "parameters": name,
        },
    }


def _guest_path(key: str) -> Spec:
    schema = {"type": "string", "pattern": "^/", "maxLength": 4096}
    return query_param(key, "an absolute path in the guests", schema, required=True)


def _env_io_paths() -> dict[str, Spec]:
    name = [path_param("name", "the ENV's name")]
    results = {"type": "array", "items": obj(("vm", "ok"), vm=STR, ok={"type": "boolean"})}
    tar = {"type": "string", "format": "binary"}
    result = obj(("result",), api=api_field(), result={"type": "string", "enum": list(RESULTS)})
    return {
        "/v1/envs/{name}/run": {
            "post": operation(
                "run_env",
                "Run a command in the ENV's VMs; its events as NDJSON.",
                {200: media(ndjson={})},
                (400, 401, 403, 404, 409, 413, 502, 503),
                body=json_body(ref("ExecRequest")),
            ),
            "parameters": name,
        },
        "/v1/envs/{name}/files": {
            "put": operation(
                "push",
                "Unpack a tar into ?dest= in each VM (owner and size checked before reading).",
                {200: results},
                (400, 401, 404, 413),
                body={"required": False, "content": {"application/x-tar": {"schema": tar}}},
                params=(_guest_path("dest"),),
            ),
            "get": operation(
                "get",
                "?path= of each VM as a base64 tar.",
                {200: results},
                (400, 401, 404),
                params=(_guest_path("path"),),
            ),
            "parameters": name,
        },
        "/v1/envs/{name}/result": {
            "post": operation(
                "report_result",
                "How the job in this ENV ended (its owner or an admin).",
                {200: {"type": "object"}},
                (400, 401, 403, 404, 413),
                body=json_body(result),
            ),
            "parameters": name,
        },
    }


def env_paths() -> dict[str, Spec]:
    """The ENV routes: /v1/envs, /v1/envs/{name}/..., /v1/queue and /v1/jobs."""
    return {**_collection_paths(), **_env_item_paths(), **_env_io_paths()}
