"""Cache volumes in the OpenAPI descriptions (scheduler and hostd). Pure."""

from __future__ import annotations

from ttci.model.cache import KEY_RE
from ttci.wire.openapi import INT, NUM, STR, Spec, ecma, obj, operation, path_param, query_param

__all__ = ["CACHE", "COMMIT_CACHE", "hostd_cache_paths", "scheduler_cache_paths"]

CACHE: Spec = {
    "anyOf": [
        obj(
            ("key", "path"),
            key={"type": "string", "pattern": ecma(KEY_RE)},
            path={"type": "string", "pattern": "^/", "maxLength": 200},
        ),
        {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:/", "maxLength": 265},
    ],
    "description": "one cache volume mounted in every VM: {key, path} or KEY:/path",
}
COMMIT_CACHE = query_param(
    "commit_cache",
    "1: the job succeeded, its cache clones become the newest versions (else discarded)",
    {"type": "string", "enum": ["0", "1", "true", "false"]},
)
_BOOL = {"type": "boolean"}
_ROW = {"owner": STR, "project": STR, "key": STR, "bytes": INT, "hits": INT, "commits": INT}


def scheduler_cache_paths() -> dict[str, Spec]:
    cache = obj(
        ("owner", "project", "key", "hosts"),
        **_ROW,
        hosts={"type": "array", "items": STR},
        newest_host=STR,
        committed_at=NUM,
        last_used=NUM,
        misses=INT,
        in_use=_BOOL,
    )
    return {
        "/v1/caches": {
            "get": operation(
                "list_caches",
                "Your cache volumes over the pool (an admin's: all).",
                {200: {"type": "array", "items": cache}},
                (401,),
            )
        },
        "/v1/caches/{key}": {
            "delete": operation(
                "delete_cache",
                "Delete a cache on every host (?project= a CI project's; ?owner= admins).",
                {200: obj(("key", "deleted"), key=STR, deleted=_BOOL, project=STR)},
                (400, 401, 404),
                params=(
                    query_param("project", "e.g. gitlab:group/proj (default user:NAME)", STR),
                    query_param("owner", "another account's cache (admins)", STR),
                ),
            ),
            "parameters": [path_param("key", "the cache's KEY")],
        },
    }


def hostd_cache_paths() -> dict[str, Spec]:
    return {
        "/v1/caches": {
            "get": operation(
                "list_caches",
                "This host's caches (?owner= one account's).",
                {200: {"type": "array", "items": obj(("scope_id",), scope_id=STR, **_ROW)}},
                (401,),
                params=(query_param("owner", "one account's caches", STR),),
            )
        },
        "/v1/caches/{scope_id}": {
            "delete": operation("delete_cache", "Forget a cache.", {204: None}, (401, 404)),
            "parameters": [path_param("scope_id", "the cache's scope id")],
        },
    }
