"""hostd's internal HTTP API (used by the scheduler). Views parse, then call VMManager."""

from __future__ import annotations

import io
import logging
import os
import platform
import queue
import tarfile
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from hostd.images.catalogue import find
from hostd.service import cache_api, images_api, metrics
from hostd.service.health import hostd_checks
from hostd.vm.accel import choose_accel
from hostd.vm.agent_client import OutputTooLarge
from hostd.vm.engine import EngineError
from hostd.vm.manager import NoCapacity, NotFound, VMLost, VMManager
from hostd.vm.warm import TemplateError, TemplateSpec, vcpus_for
from ttci import __version__
from ttci.infra.health import HEALTH_ROUTES, install_health
from ttci.infra.http_server import (
    body_chunks,
    install_auth,
    install_errors,
    json_body,
    ndjson,
    query_bool,
)
from ttci.model.errors import AgentError, BadInput, BootError, TTError
from ttci.model.resources import validate_vm_size
from ttci.wire.api import API_VERSION
from ttci.wire.commands import EventKind, ExecEvent, ExecRequest
from ttci.wire.envs import VMRequest
from ttci.wire.openapi_hostd import hostd_openapi

__all__ = [
    "bp",
    "create_app",
    "create_vm",
    "delete_vm",
    "env_egress",
    "exec_events",
    "exec_vm",
    "get",
    "get_vm",
    "host",
    "host_info",
    "images",
    "list_templates",
    "list_vms",
    "make_template",
    "push",
]

bp = Blueprint("hostd", __name__, url_prefix="/v1")
log = logging.getLogger("hostd.service.api")
MAX_PUSH_BYTES = 1 << 30  # a push's tar, a get's (waitress takes no larger body either)
MAX_MESSAGES = 1 << 20  # what tar in the guest may say on stderr while pushing or getting
EXEC_QUEUE = 16  # events (each at most one frame, 1 MiB) waiting for an exec stream's reader
OPEN_ROUTES = (
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    *HEALTH_ROUTES,
)


def _mgr() -> VMManager:
    mgr: VMManager = current_app.config["VMS"]
    return mgr


@bp.get("/host")
def host() -> Response:
    return jsonify(host_info(_mgr()))


def host_info(mgr: VMManager) -> dict[str, Any]:
    """What this host offers: capacity, use, images, accelerator (also sent as heartbeat)."""
    used = mgr.used()
    return dict(
        {
            "host_id": mgr.cfg.host_id,
            "version": __version__,
            "api": API_VERSION,
            "machine": platform.machine(),
            "total": mgr.cfg.total.to_dict(),
            "used": used.to_dict(),
            "free": (mgr.cfg.total - used).to_dict(),
            "vms": sum(1 for r in mgr.all() if r["state"] == "running"),
            "images": [_image_json(i) for i in mgr.images()],
            "engine": mgr.engine.check(),
            "warm": mgr.templates.report(),
            "caches": mgr.caches.report(),
            **dict(zip(("accel", "accel_why"), mgr.accel(), strict=True)),
        }
    )


def _image_json(i: Any) -> dict[str, Any]:
    m = i.manifest
    return {
        "name": m.name,
        "os": m.os,
        "release": m.release,
        "arch": m.arch,
        "profile": m.profile,
        "kernel": m.kernel_version,
        "built_at": m.built_at,
        "disk_gib": m.disk_virtual_size >> 30,
        # What a host lacking it fetches (hostd.images.transfer): content address and size.
        "digest": m.digest,
        "bytes": sum(f.size for f in m.files()),
        **({"recipe_sha256": m.recipe_sha256} if m.recipe_sha256 else {}),
    }


@bp.get("/images")
def images() -> Response:
    return jsonify([_image_json(i) for i in _mgr().images()])


@bp.get("/templates")
def list_templates() -> Response:
    """Snapshot templates, restore self-tests, warm hits and misses (hostd.vm.templates)."""
    return jsonify(_mgr().templates.report())


@bp.post("/templates")
def make_template() -> tuple[Response, int]:
    """Make (or find) the template of {image, cpus, memory_mib, disk_gib}; waits until ready."""
    mgr, body = _mgr(), json_body()
    image = find(mgr.cfg.image_path, str(body.get("image") or ""))
    try:
        cpus = float(body.get("cpus", 1))
        memory_mib = int(body.get("memory_mib", 512))
        disk_gib = int(body.get("disk_gib") or 0) or max(1, image.manifest.disk_virtual_size >> 30)
    except (TypeError, ValueError) as e:
        raise BadInput(f"bad size: {e}", hint='{"cpus": 1, "memory_mib": 512}') from None
    problems = validate_vm_size(cpus, memory_mib, disk_gib)
    if problems:
        raise BadInput("; ".join(problems), hint="pick sizes inside the ranges")
    accel, _ = choose_accel(image)
    spec = TemplateSpec(image, vcpus_for(cpus), memory_mib, disk_gib, accel)
    row = mgr.templates.make(spec)
    return jsonify({k: v for k, v in row.items() if k not in ("token", "dir", "key")}), 201


@bp.get("/vms")
def list_vms() -> Response:
    return jsonify(_mgr().all())


@bp.post("/vms")
def create_vm() -> tuple[Response, int]:
    req = VMRequest.from_dict(json_body())
    row = current_app.config["METRICS"].count_boot(lambda: _mgr().create(req))
    return jsonify(row), 201


@bp.get("/envs/<env>/egress")
def env_egress(env: str) -> Response:
    """The ENV's egress on this host: mode, allow-list, resolver, denied count and where to."""
    info = _mgr().net.egress_info(env)
    if not info:
        raise NotFound(f"no ENV {env} on host {_mgr().cfg.host_id}")
    return jsonify(info)


@bp.get("/vms/<vm_id>")
def get_vm(vm_id: str) -> Response:
    return jsonify(_mgr().get(vm_id))


@bp.delete("/vms/<vm_id>")
def delete_vm(vm_id: str) -> tuple[str, int]:
    """?commit_cache=1: the job succeeded; the VM's cache clone becomes its newest version."""
    _mgr().delete(vm_id, commit_cache=query_bool("commit_cache"))
    return "", 204


def exec_events(mgr: VMManager, vm_id: str, req: ExecRequest) -> Iterator[ExecEvent]:
    """Run a command and yield its events as they happen; a dropped client cancels it."""
    agent = mgr.agent(vm_id)  # raises before the stream starts: a proper HTTP error
    events: queue.Queue[ExecEvent | None] = queue.Queue(maxsize=EXEC_QUEUE)
    abandoned = threading.Event()
    channel: list[int] = []

    def emit(ev: ExecEvent | None) -> None:
        while not abandoned.is_set():  # nobody reads an abandoned stream: drop, never block
            try:
                events.put(ev, timeout=0.5)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            st = mgr.exec(
                vm_id,
                list(req.argv),
                env=req.env,
                cwd=req.cwd,
                stdin=req.stdin,
                timeout=req.timeout,
                on_start=channel.append,
                on_stdout=lambda b: emit(ExecEvent.output(EventKind.STDOUT, b)),
                on_stderr=lambda b: emit(ExecEvent.output(EventKind.STDERR, b)),
            )
            emit(ExecEvent.exit(st))
        except VMLost as e:
            emit(ExecEvent.error(e.message, lost=True))
        except TTError as e:
            emit(ExecEvent.error(e.message))
        except Exception as e:  # the stream must always end with exit or error
            log.exception("exec on %s failed", vm_id)
            emit(ExecEvent.error(f"hostd failed: {e!r}"))
        finally:
            emit(None)

    def gen() -> Iterator[ExecEvent]:
        threading.Thread(target=work, daemon=True).start()
        finished = False
        try:
            yield ExecEvent.start()
            while (ev := events.get()) is not None:
                yield ev
            finished = True
        finally:
            abandoned.set()
            if not finished and channel:
                agent.cancel(channel[0])

    return gen()


@bp.post("/vms/<vm_id>/exec")
def exec_vm(vm_id: str) -> Response:
    events = exec_events(_mgr(), vm_id, ExecRequest.from_dict(json_body()))
    return ndjson(ev.to_dict() for ev in current_app.config["METRICS"].timed_exec(events))


def _guest_path(key: str, hint: str) -> str:
    """An absolute guest path from the query string (?dest=, ?path=)."""
    path = request.args.get(key, "")
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise BadInput(f"{key} {path[:100]!r} is not an absolute guest path", hint=hint)
    return path


@bp.put("/vms/<vm_id>/files")
def push(vm_id: str) -> Response:
    """Body: a tar stream, unpacked into ?dest= in the guest (created if missing). The VM and
    the announced size are checked before the body is read; the body goes on to the guest as
    it arrives (at most MAX_PUSH_BYTES, the --max-files setting)."""
    _mgr().get(vm_id)
    dest = _guest_path("dest", "dest=/root/work")
    chunks = body_chunks(current_app.config["MAX_PUSH_BYTES"])
    sent = [0]

    def counted() -> Iterator[bytes]:
        for chunk in chunks:
            sent[0] += len(chunk)
            yield chunk

    out = bytearray()
    st = _exec_capped(
        vm_id,
        ["sh", "-c", 'mkdir -p "$1" && tar -x -C "$1"', "tt-push", dest],
        MAX_MESSAGES,
        stdin=counted(),
        on_stderr=out.extend,
        on_stdout=out.extend,
    )
    if not st.ok:
        raise BadInput(
            f"unpacking into {dest} failed: {out.decode(errors='replace')[:2000]}",
            hint="check the destination path and permissions in the VM",
        )
    return jsonify({"bytes": sent[0], "dest": dest})


def _exec_capped(vm_id: str, argv: list[str], limit: int, **kw: Any) -> Any:
    """mgr.exec with the guest's output bounded: past limit bytes the command is killed and
    the request refused (the guest's answer is never held whole beyond that)."""
    try:
        return _mgr().exec(vm_id, argv, max_output=limit, **kw)
    except OutputTooLarge as e:
        raise BadInput(
            f"the VM's answer is over this host's limit of {limit} bytes: {e.message}",
            hint="ask for less, or raise tt-hostd's --max-files",
        ) from None


@bp.get("/vms/<vm_id>/files")
def get(vm_id: str) -> Response:
    """A tar stream of ?path= in the guest (a file or a directory), at most MAX_GET_BYTES (the
    --max-files setting): a bigger one is stopped in the guest as it passes the limit. Links are
    followed in the guest (-h, --hard-dereference): the archive holds files and directories."""
    path = _guest_path("path", "path=/etc/os-release")
    buf = io.BytesIO()
    err = bytearray()
    parent, name = os.path.split(path.rstrip("/")) if path != "/" else ("/", ".")
    limit = current_app.config["MAX_GET_BYTES"]
    try:
        st = _mgr().exec(
            vm_id,
            ["tar", "-c", "-h", "--hard-dereference", "-C", parent or "/", "--", name],
            max_output=limit + MAX_MESSAGES,
            on_stdout=buf.write,
            on_stderr=err.extend,
        )
    except OutputTooLarge:
        st = None
    if st is None or buf.tell() > limit:
        raise BadInput(
            f"{path} in the VM is over this host's limit of {limit} bytes (it was stopped)",
            hint="ask for less, or raise tt-hostd's --max-files",
        )
    if not st.ok:
        raise BadInput(
            f"cannot read {path}: {err.decode(errors='replace').strip()[:2000]}",
            hint="check the path exists in the VM",
        )
    try:
        buf.seek(0)
        tarfile.open(fileobj=buf, mode="r:").close()  # the guest's answer is an archive
    except tarfile.TarError as e:
        raise AgentError(
            f"the guest's tar of {path} is not an archive: {e}", hint="the guest is broken"
        ) from None
    buf.seek(0)
    return Response(iter(lambda: buf.read(1 << 20), b""), mimetype="application/x-tar")


def create_app(mgr: VMManager, token: str, max_files: int = MAX_PUSH_BYTES) -> Flask:
    """max_files: the largest tar a push or a get moves (--max-files)."""
    app = Flask("hostd")
    app.config["VMS"] = mgr
    app.config["METRICS"] = metrics.HostMetrics(lambda: metrics.hostd_snapshot(mgr))
    app.config["MAX_PUSH_BYTES"] = app.config["MAX_GET_BYTES"] = max_files
    install_auth(app, {token: "scheduler"}, open_routes=OPEN_ROUTES)
    install_errors(
        app,
        {
            NotFound: 404,
            NoCapacity: 409,
            VMLost: 410,
            BadInput: 400,
            BootError: 502,
            EngineError: 503,
            AgentError: 502,
            TemplateError: 502,
        },
    )
    app.register_blueprint(bp)
    app.register_blueprint(images_api.bp)
    app.register_blueprint(cache_api.bp)
    app.config["FETCHER"] = None  # serve.py sets it when the host joined a scheduler

    install_health(app, "tt-hostd", hostd_checks(app, mgr))  # /healthz, /readyz

    @app.get("/v1/health")
    def health() -> Response:
        return jsonify({"ok": True, "host_id": mgr.cfg.host_id})

    description = hostd_openapi()

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        """This API as an OpenAPI 3.1 description (open, like /v1/health)."""
        return jsonify(description)

    @app.get("/metrics")
    def prometheus() -> Response:
        """Open like node_exporter's: counts and sizes only (ENV names label the egress
        counts), never a token or a command line."""
        body = app.config["METRICS"].exposition()
        return Response(body, content_type=metrics.CONTENT_TYPE)

    return app
