"""The image-transfer routes in the OpenAPI descriptions of the scheduler and hostd. Pure.

A host that lacks an image asks the scheduler which ones it lacks and fetches their manifest and
files through it, bearing its own token (header X-TT-Host: ID); an admin may do the same, and
ask hosts to fetch one now. hostd serves its images' manifest and files (HTTP Range) and takes
fetch requests (ttci/scheduler/web/images_api.py, hostd/service/images_api.py).
"""

from __future__ import annotations

from ttci.wire.openapi import (
    STR,
    Spec,
    json_body,
    media,
    obj,
    operation,
    path_param,
    query_param,
)

__all__ = ["hostd_image_paths", "scheduler_image_paths"]

_BYTES: Spec = {"type": "string", "format": "binary"}
_DIGEST_TEXT: Spec = {"type": "string", "maxLength": 64}
_FILE = {"application/octet-stream": _BYTES}
_DIGEST = query_param("digest", "the build's digest (another build: 409)", STR)
_NAME = path_param("name", "an image name, e.g. qemu:debian-12:amd64")
_REL = path_param("rel", "one of the files its manifest lists")
# A host's own token, or an admin's.
_HOST_OR_ADMIN: list[dict[str, list[str]]] = [{"hostToken": []}, {"userToken": []}]


def scheduler_image_paths() -> dict[str, Spec]:
    manifest_errors = (400, 401, 403, 404, 409, 502, 503)
    return {
        "/v1/hosts/{host_id}/images/missing": {
            "get": operation(
                "missing_images",
                "The pool's images this host lacks, each with its digest (the host or an admin).",
                {200: {"type": "array", "items": {"type": "object"}}},
                (401, 403, 404),
                security=_HOST_OR_ADMIN,
            ),
            "parameters": [path_param("host_id", "the host's id")],
        },
        "/v1/images/{name}/manifest": {
            "get": operation(
                "image_manifest",
                "The image's manifest from a host that has it.",
                {200: {"type": "object"}},
                manifest_errors,
                params=(_DIGEST,),
                security=_HOST_OR_ADMIN,
            ),
            "parameters": [_NAME],
        },
        "/v1/images/{name}/files/{rel}": {
            "get": operation(
                "image_file",
                "One of its files, streamed from a host with that build (Range passes through).",
                {200: _FILE, 206: _FILE},
                (*manifest_errors, 416),
                params=(_DIGEST,),
                security=_HOST_OR_ADMIN,
            ),
            "parameters": [_NAME, _REL],
        },
        "/v1/images/{name}/distribute": {
            "post": operation(
                "distribute",
                "Ask hosts (none named: every up host lacking it) to fetch the image. Admins.",
                {202: {"type": "object"}},
                (400, 401, 403, 404, 413),
                body=json_body(obj((), hosts={"type": "array", "items": STR}), required=False),
            ),
            "parameters": [_NAME],
        },
    }


def hostd_image_paths() -> dict[str, Spec]:
    return {
        "/v1/images/{name}/manifest": {
            "get": operation(
                "image_manifest",
                "The image's manifest.json byte for byte.",
                {200: {"type": "object"}},
                (400, 401, 404, 409),
                params=(_DIGEST,),
            ),
            "parameters": [_NAME],
        },
        "/v1/images/{name}/files/{rel}": {
            "get": operation(
                "image_file",
                "One of the image's files, with HTTP Range support.",
                {200: _FILE, 206: _FILE, 304: None},
                (400, 401, 404, 409, 416),
                params=(_DIGEST,),
            ),
            "parameters": [_NAME, _REL],
        },
        "/v1/images/fetch": {
            "post": operation(
                "fetch_image",
                "Fetch an image from the pool now, in the background.",
                {202: obj(("name", "queued"), name=STR, queued={"type": "boolean"})},
                (400, 401, 409, 413),
                body=json_body(
                    obj(("name",), name=STR, digest={"type": "string", "maxLength": 64})
                ),
            )
        },
        "/v1/images/fetches": {
            "get": operation(
                "image_fetches",
                "What this host is fetching and has fetched lately.",
                {200: media(json={"type": "object"})},
                (401,),
            )
        },
    }
