"""The scheduler's image-transfer routes (ttci.scheduler.image_broker): a host that lacks an
image asks which ones it lacks and fetches them here, bearing its own token (header
`X-TT-Host: ID`); an admin may do the same (`tt image pull`) and ask hosts to fetch one now
(`tt image push`). The bytes come from a host that has the image, streamed through; Range
requests pass through, so a cut transfer resumes."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from ttci.infra.http_server import bearer_token, error_response, json_body
from ttci.model.errors import BadInput
from ttci.scheduler.hostd_client import HostdError
from ttci.scheduler.hosts import HostNotFound, HostRefused, credential_ok
from ttci.scheduler.image_broker import ImageBroker, NoSource, missing_images, stream
from ttci.scheduler.service import Scheduler

__all__ = [
    "OPEN_ROUTES",
    "TransferRefused",
    "bp",
    "distribute",
    "image_file",
    "image_manifest",
    "missing",
]

bp = Blueprint("scheduler_images", __name__, url_prefix="/v1")
# Hosts bear their own token, not a user's: these routes check it themselves.
OPEN_ROUTES = (
    ("GET", "/v1/images/<name>/manifest"),
    ("GET", "/v1/images/<name>/files/<rel>"),
    ("GET", "/v1/hosts/<host_id>/images/missing"),
)
_PASSED_HEADERS = ("Content-Length", "Content-Range", "Accept-Ranges", "Content-Type", "ETag")


class TransferRefused(HostRefused):
    """Neither a registered host bearing its own token nor an admin."""


def _s() -> Scheduler:
    s: Scheduler = current_app.config["SCHEDULER"]
    return s


def _broker() -> ImageBroker:
    broker: ImageBroker | None = current_app.config.get("IMAGE_BROKER")
    if broker is None:
        broker = current_app.config["IMAGE_BROKER"] = ImageBroker(_s().pool)
    return broker


def _requester() -> str | Response:
    """The host id of a host bearing its own token ("" for an admin), or a 401 answer.

    Raises:
        TransferRefused: a host id with the wrong token, or a user who is not an admin.
    """
    hid = request.headers.get("X-TT-Host", "")
    if hid:
        try:
            row = _s().pool.row(hid)
        except HostNotFound:
            raise TransferRefused(f"no registered host {hid[:64]!r}", hint="join first") from None
        if row["kind"] != "registered" or not credential_ok(bearer_token(), row):
            raise TransferRefused(
                f"this request does not bear host {hid}'s token",
                hint="a host fetches images with the token it registered with",
            )
        return hid
    user = _s().users.resolve(bearer_token())
    if user is None:
        return error_response(401, "missing or wrong token", hint="a host's or an admin's token")
    if not user.admin:
        raise TransferRefused(
            f"user {user.name} may not fetch images", hint="images travel to hosts and admins"
        )
    return ""


def _no_source(e: NoSource) -> Response:
    return error_response(404, e.message, e.hint, kind="NoSource")


def _passed_on(e: HostdError) -> Response:
    """The serving host's own refusal (no such file, another build, a range past the end) is
    the answer; anything else stays a 502 (the host failed)."""
    if e.status in (404, 409, 416):
        return error_response(e.status, e.message, e.hint, kind=e.kind)
    raise e


@bp.get("/hosts/<host_id>/images/missing")
def missing(host_id: str) -> Response:
    """The pool's images this host lacks, each with the digest to fetch (the host itself or
    an admin may ask)."""
    who = _requester()
    if isinstance(who, Response):
        return who
    if who and who != host_id:
        raise TransferRefused(f"host {who} asked for host {host_id}'s list", hint="ask for yours")
    _s().pool.row(host_id)  # 404 for an unknown host (an admin's typo)
    return jsonify(missing_images(_s().pool.public_all(), host_id))


@bp.get("/images/<name>/manifest")
def image_manifest(name: str) -> Response:
    """The image's manifest.json from a host that has it (?digest= pins the build)."""
    who = _requester()
    if isinstance(who, Response):
        return who
    try:
        raw = _broker().manifest(name, request.args.get("digest", ""), requester=who)
    except NoSource as e:
        return _no_source(e)
    except HostdError as e:
        return _passed_on(e)
    return Response(raw, mimetype="application/json")


@bp.get("/images/<name>/files/<rel>")
def image_file(name: str, rel: str) -> Response:
    """One of the image's files, streamed from a host that has that build (?digest=); a Range
    header is passed on (206 answers resume a cut transfer)."""
    who = _requester()
    if isinstance(who, Response):
        return who
    digest = request.args.get("digest", "")
    try:
        hid, upstream = _broker().open_file(
            name, rel, digest, request.headers.get("Range", ""), requester=who
        )
    except NoSource as e:
        return _no_source(e)
    except HostdError as e:
        return _passed_on(e)
    headers = {k: upstream.headers[k] for k in _PASSED_HEADERS if k in upstream.headers}
    headers["X-TT-Source-Host"] = hid
    return Response(
        stream(upstream), status=upstream.status_code, headers=headers, direct_passthrough=True
    )


@bp.post("/images/<name>/distribute")
def distribute(name: str) -> tuple[Response, int]:
    """Admin: ask hosts (body {"hosts": [...]}; none: every up host lacking it) to fetch the
    image now. Each fetches in the background; `tt image list` shows when it has it."""
    user = current_app.config["SCHEDULER"].users.resolve(bearer_token())
    if user is None or not user.admin:
        raise TransferRefused("only admins distribute images", hint="ask an admin")
    body = json_body()
    targets = body.get("hosts", [])
    if not isinstance(targets, list) or not all(isinstance(h, str) for h in targets):
        raise BadInput("hosts must be a list of host ids", hint='{"hosts": ["h2"]}')
    try:
        return jsonify(_broker().distribute(name, targets)), 202
    except NoSource as e:
        return _no_source(e), 404
