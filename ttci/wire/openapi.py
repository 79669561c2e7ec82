"""Building blocks of our OpenAPI 3.1 descriptions (openapi_scheduler.py, openapi_hostd.py). Pure.

The descriptions are data: request schemas come from the wire shapes' own limits (names,
ranges, enums), answers are described as far as clients rely on them. Every operation lists
the statuses it can answer; an error answer is ttci.wire.api.ErrorBody. A test checks each
description against the Flask routes, and a fuzzer (schemathesis) checks the running services
against it.
"""

from __future__ import annotations

import re
from typing import Any

from ttci.wire.api import API_VERSIONS

__all__ = [
    "ERROR",
    "INT",
    "NDJSON",
    "NUM",
    "STR",
    "Answer",
    "Spec",
    "api_field",
    "ecma",
    "health_paths",
    "json_body",
    "media",
    "obj",
    "operation",
    "path_param",
    "query_param",
    "ref",
]

Spec = dict[str, Any]
STR: Spec = {"type": "string"}
INT: Spec = {"type": "integer"}
NUM: Spec = {"type": "number"}
NDJSON = "application/x-ndjson"
ERROR: Spec = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "hint": {"type": "string"},
        "kind": {"type": "string"},
    },
}
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "The request is malformed (the error names the field and how to write it)",
    401: "No token, or a wrong one",
    403: "Not allowed (not an admin, a wrong join token, another API version)",
    404: "No such thing (or not yours)",
    405: "Method not allowed",
    408: "The ENV waited past its max_wait",
    409: "It conflicts with the current state",
    410: "The VM is gone",
    413: "The body is larger than this route takes",
    502: "A host or a guest failed",
    503: "A host or the VM engine is unreachable (/readyz: not ready, and why)",
}


def ecma(pattern: re.Pattern[str]) -> str:
    """A Python pattern written with \\A...\\Z as the ECMA regex JSON Schema uses (^...$:
    without the multiline flag, $ matches only at the very end there)."""
    text = pattern.pattern
    if text.startswith("\\A"):
        text = "^" + text[2:]
    if text.endswith("\\Z"):
        text = text[:-2] + "$"
    return text


def ref(name: str) -> Spec:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: tuple[str, ...] = (), **props: Spec) -> Spec:
    """An object schema; more properties than those named may come (forward compatibility)."""
    out: Spec = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def health_paths() -> Spec:
    """GET /healthz (alive) and GET /readyz (ready: 200, or 503 naming the failed checks), open
    on every daemon (ttci/infra/health.py)."""
    check = obj(("ok",), ok={"type": "boolean"}, detail=STR, error=STR, ms=NUM)
    ready = obj(
        ("ready", "failed", "checks"),
        ready={"type": "boolean"},
        failed={"type": "array", "items": STR},
        checks={"type": "object", "additionalProperties": check},
        program=STR,
        version=STR,
    )
    alive = obj(("ok",), ok={"type": "boolean"}, program=STR, version=STR)
    return {
        "/healthz": {
            "get": operation("healthz", "Alive (liveness).", {200: alive}, (), security=[])
        },
        "/readyz": {
            "get": operation(
                "readyz",
                "Ready (readiness): each check and what failed.",
                {200: ready, 503: ready},
                (),
                security=[],
            )
        },
    }


def api_field() -> Spec:
    return {
        "type": "integer",
        "enum": list(API_VERSIONS),
        "description": "the API version (this one and the previous are taken)",
    }


def json_body(schema: Spec, required: bool = True) -> Spec:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def path_param(name: str, description: str, schema: Spec | None = None) -> Spec:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    }


def query_param(name: str, description: str, schema: Spec, required: bool = False) -> Spec:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


Answer = Spec | None | dict[str, Spec]  # a JSON schema, no body, or media type -> schema


def _response(status: int, answer: Answer) -> Spec:
    out: Spec = {"description": _REASONS.get(status, "")}
    if isinstance(answer, dict) and answer and all("/" in k for k in answer):
        out["content"] = {media: {"schema": schema} for media, schema in answer.items()}
    elif answer is not None:
        out["content"] = {"application/json": {"schema": answer}}
    return out


def media(**kinds: Spec) -> dict[str, Spec]:
    """Answers of several media types: media(json=..., ndjson=..., tar=..., text=...)."""
    names = {"json": "application/json", "ndjson": NDJSON, "text": "text/plain"}
    return {names[k]: v for k, v in kinds.items()}


def operation(
    op_id: str,
    summary: str,
    ok: dict[int, Answer],
    errors: tuple[int, ...],
    *,
    body: Spec | None = None,
    params: tuple[Spec, ...] = (),
    security: list[dict[str, list[str]]] | None = None,
) -> Spec:
    """One operation. ok: status -> the answer's JSON schema (None: no body; media(...) for
    other or several media types). errors: the error statuses it answers (ErrorBody).
    security: None keeps the description's default; [] marks an open route."""
    responses: Spec = {str(status): _response(status, answer) for status, answer in ok.items()}
    for status in errors:
        responses[str(status)] = _response(status, ref("Error"))
    out: Spec = {"operationId": op_id, "summary": summary, "responses": responses}
    if body is not None:
        out["requestBody"] = body
    if params:
        out["parameters"] = list(params)
    if security is not None:
        out["security"] = security
    return out
