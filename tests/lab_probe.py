"""Probes a test runs inside a lab namespace, by address only (never getaddrinfo on a name: that
would read this machine's /etc/resolv.conf):

  python -m tests.lab_probe dns SERVER NAME     one A query to SERVER:53 -> rcode, answers, ms
  python -m tests.lab_probe get ADDR PORT [S]   an HTTP GET / -> the body, or the error
  python -m tests.lab_probe dns-many SERVER TEMPLATE N   N queries (TEMPLATE's {i} -> 0..N-1)

Each prints one JSON line.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import sys
import time
from typing import Any

RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def dns_query(server: str, name: str, port: int = 53, timeout: float = 3.0) -> dict[str, Any]:
    """One A query over UDP; {"rcode", "answers": [[addr, ttl]], "ms"} or {"error", "ms"}."""
    qid = secrets.randbelow(65536)
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        msg += bytes([len(label)]) + label.encode()
    msg += b"\0" + struct.pack(">HH", 1, 1)
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(msg, (server, port))
            data = s.recv(4096)
        except OSError as e:
            return {"error": str(e) or type(e).__name__, "ms": (time.monotonic() - t0) * 1000}
    ms = (time.monotonic() - t0) * 1000
    rcode = RCODES.get(data[3] & 15, str(data[3] & 15))
    return {"rcode": rcode, "answers": _answers(data), "ms": ms}


def _answers(data: bytes) -> list[list[Any]]:
    count = struct.unpack(">H", data[6:8])[0]
    i = 12
    while data[i]:
        i += data[i] + 1
    i += 5
    out: list[list[Any]] = []
    for _ in range(count):
        if data[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while data[i]:
                i += data[i] + 1
            i += 1
        rtype, _, ttl, length = struct.unpack(">HHIH", data[i : i + 10])
        i += 10
        if rtype == 1:
            out.append([socket.inet_ntoa(data[i : i + 4]), ttl])
        i += length
    return out


def http_get(addr: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        return {"error": str(e) or type(e).__name__, "ms": (time.monotonic() - t0) * 1000}
    body = data.partition(b"\r\n\r\n")[2].decode(errors="replace")
    return {"body": body, "ms": (time.monotonic() - t0) * 1000}


def main() -> None:
    op, *args = sys.argv[1:]
    timeout = float(args[2]) if len(args) > 2 else 3.0
    if op == "dns":
        print(json.dumps(dns_query(args[0], args[1], timeout=timeout)))
    elif op == "get":
        print(json.dumps(http_get(args[0], int(args[1]), timeout)))
    elif op == "dns-many":
        runs = [dns_query(args[0], args[1].format(i=i)) for i in range(int(args[2]))]
        print(json.dumps(runs))
    else:
        raise SystemExit(f"unknown probe {op}")


if __name__ == "__main__":
    main()
