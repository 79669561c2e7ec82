"""Where the daemons' HTTP servers start (tt-scheduler, tt-hostd, tt-github-webhooks): one place
that chooses the server.

- Plain HTTP (loopback, the all-in-one cloud): waitress, as always; or cheroot when the caller
  asks (engine="cheroot": the scheduler, whose many concurrent short reads waitress's asyncore
  loop serves worse: it re-polls every channel while a worker writes, and that busy loop holds
  the GIL: 50 clients on 2 cores, 600 -> 900 requests/s, p99 245 -> 158 ms).
- HTTPS (`--tls-cert`/`--tls-key`): waitress cannot do TLS, so cheroot (CherryPy's WSGI server)
  with the standard library's ssl module. It writes each chunk of a streamed response as the
  app yields it (chunked transfer encoding), which the NDJSON streams (ENV progress, command
  output) need. The TLS handshake runs in a worker thread with its own short timeout, never in
  the accept loop, so a client that connects and stays silent delays nobody else; a plain HTTP
  request to the TLS port gets a JSON 400 saying to use https. Its threads are daemon threads
  like waitress's: a stream still open never keeps a stopping daemon alive.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import waitress
from cheroot import server as cheroot_server
from cheroot import wsgi as cheroot_wsgi
from cheroot.ssl import Adapter
from cheroot.ssl.builtin import BuiltinSSLAdapter

from ttci.infra.tls import TLSFiles, server_context

__all__ = ["HANDSHAKE_TIMEOUT_S", "TLS_IO_TIMEOUT_S", "WebServer", "make_server"]

log = logging.getLogger("ttci.infra.web_server")

HANDSHAKE_TIMEOUT_S = 10  # a TLS client must finish its handshake within this
TLS_IO_TIMEOUT_S = 60  # one blocked read/write on a TLS connection; idle keep-alive lifetime
_STOP_WAIT_S = 1  # stopping waits this long for requests in flight (waitress: not at all)
_DRAIN_MAX = 64 << 10  # unread body bytes a kept-alive connection may read past the answer
_PLAIN_ANSWER = json.dumps(
    {
        "error": "this port serves HTTPS; the request came as plain HTTP",
        "hint": "use https://ADDR:PORT, or configure the CA (TT_CA_FILE) for a bare ADDR:PORT",
    }
).encode()


class _LazyTLS(BuiltinSSLAdapter):
    """Wraps accepted sockets without a handshake (the worker does it, see _TLSConnection)."""

    def __init__(self, files: TLSFiles) -> None:
        # Not BuiltinSSLAdapter's own: no second context, no loopback handshake at start.
        Adapter.__init__(self, str(files.cert), str(files.key))
        self.context = server_context(files)

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), {}


class _RefusingRequest(cheroot_server.HTTPRequest):
    """An answer sent before most of a big body was read (a push refused unread) closes the
    connection: cheroot would otherwise read the rest of the body into memory at once to keep
    the connection alive (a 300 MB refused push: +127 MiB)."""

    def send_headers(self) -> None:
        if getattr(self.rfile, "remaining", 0) > _DRAIN_MAX:
            self.close_connection = True
        super().send_headers()


class _PlainConnection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _RefusingRequest


class _TLSConnection(_PlainConnection):
    """A connection whose first request first completes the handshake, in the worker thread."""

    _handshaken = False

    def communicate(self) -> bool:
        if not self._handshaken:
            if not _handshake(self.socket, self.remote_addr):
                return False
            self._handshaken = True
        out: bool = super().communicate()  # type: ignore[no-untyped-call]
        return out


def _handshake(sock: ssl.SSLSocket, peer: object) -> bool:
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        sock.do_handshake()
    except ssl.SSLError as e:
        if "HTTP_REQUEST" in str(e.reason).upper():  # plain HTTP sent to the TLS port
            _answer_plain(sock)
        else:
            log.debug("TLS handshake with %s failed: %s", peer, e.reason)
        return False
    except OSError as e:  # timed out, reset
        log.debug("TLS handshake with %s failed: %s", peer, e)
        return False
    finally:
        sock.settimeout(TLS_IO_TIMEOUT_S)
    return True


def _answer_plain(sock: ssl.SSLSocket) -> None:
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(_PLAIN_ANSWER)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):  # below TLS: the handshake never finished
        socket.socket.sendall(sock, head.encode() + _PLAIN_ANSWER)


class WebServer:
    """A bound server: `port` (the real one for port 0), `url`, `run()` until `close()`."""

    def __init__(
        self, run: Callable[[], None], close: Callable[[], None], host: str, port: int, tls: bool
    ) -> None:
        self._run, self._close = run, close
        self.host, self.port, self.tls = host, port, tls

    @property
    def effective_port(self) -> int:  # waitress's name, kept for the callers
        return self.port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def run(self) -> None:
        self._run()

    def close(self) -> None:
        self._close()


def make_server(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    name: str,
    tls: TLSFiles | None = None,
    threads: int = 32,
    connection_limit: int = 100,
    idle_timeout: float = 120,
    engine: str = "waitress",
) -> WebServer:
    """Bind (the port is taken on return) and return the server; `run()` serves.

    connection_limit: waitress's connections at once; cheroot's idle keep-alive connections
    kept (past it, an answer closes its connection). idle_timeout: seconds an idle connection
    stays. Over TLS a connection is served by a worker while it has a request, an
    idle keep-alive connection waits without one and closes after TLS_IO_TIMEOUT_S."""
    if tls is None and engine == "cheroot":
        _warn_plain(name, host)
        return _cheroot(
            app,
            host,
            port,
            name=name,
            tls=None,
            threads=threads,
            timeout=idle_timeout,
            keep_alive=connection_limit,
        )
    if tls is None:
        _warn_plain(name, host)
        srv = waitress.create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            connection_limit=connection_limit,
            channel_timeout=idle_timeout,
            ident=name,
        )
        return WebServer(srv.run, srv.close, host, int(srv.effective_port), tls=False)
    return _cheroot(
        app, host, port, name=name, tls=tls, threads=threads, keep_alive=connection_limit
    )


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_plain(name: str, host: str) -> None:
    if not _loopback(host):
        log.warning(
            "%s serves plain HTTP on %s: tokens cross the network unencrypted "
            "(give it --tls-cert and --tls-key)",
            name,
            host,
        )


def _cheroot_server(  # noqa: PLR0917 - _cheroot's own arguments
    app: Callable[..., Any],
    host: str,
    port: int,
    name: str,
    tls: TLSFiles | None,
    threads: int,
    timeout: float,
    keep_alive: int,
) -> cheroot_wsgi.Server:
    srv = cheroot_wsgi.Server(
        (host, port),
        app,
        numthreads=threads,
        max=threads,
        server_name=name,
        timeout=int(timeout) if tls is None else TLS_IO_TIMEOUT_S,
        shutdown_timeout=_STOP_WAIT_S,
        request_queue_size=128,
    )
    # Idle keep-alive connections it keeps. cheroot's default is 10: past that, every answer
    # said `Connection: close`, so most of 50 polling clients paid a new TCP connection per
    # request (bench/scheduler.py, SQLite, 50 clients: read p99 92 -> 63 ms).
    srv.keep_alive_conn_limit = keep_alive
    srv.max_request_header_size = 262144  # waitress's limits (cheroot's default: none)
    srv.max_request_body_size = 1 << 30
    srv.ConnectionClass = _PlainConnection
    if tls is not None:
        srv.ssl_adapter = _LazyTLS(tls)
        srv.ConnectionClass = _TLSConnection
    return srv


def _cheroot(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    name: str,
    tls: TLSFiles | None,
    threads: int,
    timeout: float = TLS_IO_TIMEOUT_S,
    keep_alive: int,
) -> WebServer:
    srv = _cheroot_server(app, host, port, name, tls, threads, timeout, keep_alive)
    # Threads inherit daemon-ness from the thread that starts them: prepare (the workers) and
    # serve (the accept loop) run in daemon threads, so cheroot's threads are daemons too.
    failed: list[BaseException] = []

    def prepare() -> None:
        try:
            srv.prepare()
        except BaseException as e:  # handed to the caller below
            failed.append(e)

    t = threading.Thread(target=prepare, name=f"{name}-prepare", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    closed = threading.Event()

    def stop() -> None:
        stopper = threading.Thread(target=srv.stop, name=f"{name}-stop", daemon=True)
        stopper.start()
        stopper.join(_STOP_WAIT_S + 2)  # a worker stuck in a stream is left to exit with us

    def run() -> None:
        loop = threading.Thread(target=srv.serve, name=f"{name}-accept", daemon=True)
        loop.start()
        try:  # an Event wait: SIGTERM/SIGINT (KeyboardInterrupt) reach this thread
            while loop.is_alive() and not closed.wait(1.0):
                pass
        finally:
            stop()

    bound_port = int(srv.bind_addr[1])
    if tls is None:
        return WebServer(run, closed.set, host, bound_port, tls=False)
    log.info("%s serves HTTPS on %s:%d (certificate %s)", name, host, bound_port, tls.cert)
    return WebServer(run, closed.set, host, bound_port, tls=True)
