"""hostd's image routes: serve an image's manifest and files to the scheduler (which streams them
to a host that lacks the image; Range requests resume a cut transfer), and take the scheduler's
request to fetch one (an admin's `tt image push`). Same bearer token as the rest of the API."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request, send_file

from hostd.images.catalogue import Image, scan
from hostd.images.fetcher import Fetcher
from hostd.vm.manager import NotFound, VMManager
from ttci.infra.http_server import error_response, json_body
from ttci.model.errors import BadInput
from ttci.model.manifest import MANIFEST_FILE
from ttci.model.naming import ImageName

__all__ = ["bp", "fetch", "fetches", "image_file", "image_manifest"]

bp = Blueprint("hostd_images", __name__, url_prefix="/v1/images")


def _mgr() -> VMManager:
    mgr: VMManager = current_app.config["VMS"]
    return mgr


def _image(name: str) -> Image:
    """The whole image of exactly this name (never a prefix match: a transfer names one)."""
    canonical = str(ImageName.parse(name))
    for img in scan(_mgr().cfg.image_path)[0]:
        if img.name == canonical:
            return img
    raise NotFound(f"no image {canonical} on host {_mgr().cfg.host_id}")


def _other_build(img: Image) -> Response | None:
    """409 when ?digest= pins another build of the image than the one here."""
    digest = request.args.get("digest", "")
    if digest and digest != img.manifest.digest:
        return error_response(
            409,
            f"host {_mgr().cfg.host_id} has another build of {img.name}",
            hint="fetch it from a host with that digest",
            kind="OtherBuild",
        )
    return None


@bp.get("/<name>/manifest")
def image_manifest(name: str) -> Response:
    """The image's manifest.json byte for byte (its digest is the content address)."""
    img = _image(name)
    return _other_build(img) or Response(
        (img.path / MANIFEST_FILE).read_bytes(), mimetype="application/json"
    )


@bp.get("/<name>/files/<rel>")
def image_file(name: str, rel: str) -> Response:
    """One of the image's files (those its manifest lists), with HTTP Range support."""
    img = _image(name)
    if rel not in {f.path for f in img.manifest.files()}:
        raise NotFound(f"{img.name} has no file {rel!r}")
    resp = _other_build(img) or send_file(
        img.file(rel), mimetype="application/octet-stream", conditional=True, max_age=0
    )
    resp.headers["Accept-Ranges"] = "bytes"
    return resp


@bp.post("/fetch")
def fetch() -> tuple[Response, int]:
    """Body {"name", "digest"?}: fetch that image from the pool now (in the background)."""
    fetcher: Fetcher | None = current_app.config.get("FETCHER")
    body = json_body()
    name, digest = body.get("name"), body.get("digest", "")
    if not isinstance(name, str) or not isinstance(digest, str) or len(digest) > 64:
        raise BadInput("name must be an image name, digest its digest", hint='{"name": "..."}')
    canonical = str(ImageName.parse(name))
    if fetcher is None:
        return (
            error_response(
                409,
                f"host {_mgr().cfg.host_id} fetches no images: it did not --join a scheduler",
                hint="on that host: tt image pull NAME (or start it with --join)",
                kind="NoFetcher",
            ),
            409,
        )
    fetcher.ask(canonical, digest)
    return jsonify({"name": canonical, "queued": True}), 202


@bp.get("/fetches")
def fetches() -> Response:
    """What this host is fetching, has fetched lately (with rates), and why any failed."""
    fetcher: Fetcher | None = current_app.config.get("FETCHER")
    if fetcher is None:
        return jsonify({"auto": "off (not joined to a scheduler)", "current": None, "recent": []})
    return jsonify(fetcher.status())
