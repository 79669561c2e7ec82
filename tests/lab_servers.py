"""Test servers for a network lab's "outside" namespace: plain HTTP servers that say who they are
and a git smart-HTTP server (`git http-backend` as CGI) that wants GitLab's job-token login.

Run inside the namespace: `python -m tests.lab_servers --log FILE --http ADDR:PORT:NAME ...
--git ADDR:PORT:ROOT:TOKEN`. Raw sockets, no http.server: nothing here ever does a DNS lookup
(docs/facts/networking.md: http.server's reverse lookups stall in an isolated namespace, and no
test may query a resolver it did not start). Every request is appended to the log as one JSON
line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[socket.socket, tuple[str, int]], None]
LOCK = threading.Lock()
LOG: list[Path] = []  # where requests are noted (set once by main)


def note(**fields: object) -> None:
    if LOG:
        with LOCK, LOG[0].open("a") as f:
            f.write(json.dumps({"t": time.time(), **fields}) + "\n")


def read_request(conn: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, target, headers (lower-case names), body) of one HTTP/1.x request."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _chunked(conn, rest)
    else:
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:n]
    return method, target, headers, body


def _chunked(conn: socket.socket, buf: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += conn.recv(65536)
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buf) < size + 2:
            buf += conn.recv(65536)
        body += buf[:size]
        buf = buf[size + 2 :]
        if size == 0:
            return body


def respond(conn: socket.socket, status: str, headers: dict[str, str], body: bytes) -> None:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def plain(name: str) -> Handler:
    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        req = read_request(conn)
        if req is None:
            return
        note(server=name, peer=peer[0], method=req[0], path=req[1])
        respond(conn, "200 OK", {"Content-Type": "text/plain"}, f"hello from {name}\n".encode())

    return handle


def git(root: Path, token: str) -> Handler:
    """git http-backend behind HTTP Basic auth as GitLab takes a job token
    (user gitlab-ci-token, password the token)."""
    want = "Basic " + base64.b64encode(f"gitlab-ci-token:{token}".encode()).decode()

    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        req = read_request(conn)
        if req is None:
            return
        method, target, headers, body = req
        path, _, query = target.partition("?")
        authed = headers.get("authorization") == want
        note(server="git", peer=peer[0], method=method, path=path, authed=authed)
        if not authed:
            respond(conn, "401 Unauthorized", {"WWW-Authenticate": 'Basic realm="git"'}, b"")
            return
        env = {
            "PATH": "/usr/bin:/bin",
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "gitlab-ci-token",
            "REMOTE_ADDR": peer[0],
            "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
            "HTTP_GIT_PROTOCOL": headers.get("git-protocol", ""),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, cgi_headers = "200 OK", {}
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = v.strip()
            elif k:
                cgi_headers[k.strip()] = v.strip()
        respond(conn, status, cgi_headers, payload)

    return handle


def listen(addr: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


def serve(s: socket.socket, handle: Handler) -> None:
    def one(conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn, contextlib.suppress(OSError):
            handle(conn, peer)

    while True:
        conn, peer = s.accept()
        threading.Thread(target=one, args=(conn, peer), daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", type=Path)
    ap.add_argument("--http", action="append", default=[], help="ADDR:PORT:NAME")
    ap.add_argument("--git", action="append", default=[], help="ADDR:PORT:ROOT:TOKEN")
    args = ap.parse_args()
    if args.log:
        LOG.append(args.log)
    threads = []
    for spec in args.http:
        addr, port, name = spec.split(":", 2)
        threads.append((addr, int(port), plain(name)))
    for spec in args.git:
        addr, port, root, token = spec.split(":", 3)
        threads.append((addr, int(port), git(Path(root), token)))
    for sock, handler in [(listen(a, p), h) for a, p, h in threads]:  # all bound before ready
        threading.Thread(target=serve, args=(sock, handler), daemon=True).start()
    print("lab servers ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
