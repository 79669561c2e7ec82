"""Shared pieces of the GitHub tests: an App key pair, a real WSGI server in a thread."""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import waitress
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

RUN_SH = Path(__file__).with_name("run.sh")


@functools.cache
def app_keys() -> tuple[str, str]:
    """(private PEM, public PEM) of a test GitHub App."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve a WSGI app with waitress (as tt-github-webhooks does) on 127.0.0.1; yields the URL."""
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
    port = server.socket.getsockname()[1]  # type: ignore[attr-defined]
    closing = threading.Event()

    def run() -> None:
        try:
            server.run()
        except OSError:  # waitress's loop sees its socket closed under it: that is the stop
            if not closing.is_set():
                raise

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        closing.set()
        server.close()
        t.join(timeout=5)


def serve_argv(state_dir: Path, api_url: str, key: Path, port: int, *extra: str) -> list[str]:
    """`tt-github-webhooks serve` as an operator starts it, against the stand-in (App auth)."""
    return [
        str(Path(sys.executable).parent / "tt-github-webhooks"),
        "-v",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state_dir),
        "--api-url",
        api_url,
        "--app-id",
        "31337",
        "--app-key-file",
        str(key),
        *extra,
    ]
