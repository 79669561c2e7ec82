"""A loopback hostd stand-in for scheduler tests: it answers what the scheduler asks of a hostd
and creates and deletes VMs at once (nothing is booted)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server


@contextlib.contextmanager
def instant_hostd(info: dict[str, Any]) -> Iterator[str]:
    """Serve a stand-in reporting `info` (GET /v1/host); yields its URL, stops afterwards."""
    app = Flask("hostd-stand-in")
    app.add_url_rule("/v1/host", "host", lambda: jsonify(info))
    app.add_url_rule("/v1/vms", "vms", lambda: jsonify([]))
    app.add_url_rule("/v1/vms/<vm_id>", "delete", lambda vm_id: ("", 204), methods=["DELETE"])

    @app.post("/v1/vms")
    def create() -> tuple[Response, int]:
        vm = {"id": request.get_json()["id"], "state": "running", "boot_s": 0.0, "accel": "tcg"}
        return jsonify(vm), 201

    server = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        t.join()
