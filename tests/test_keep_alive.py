"""Many API clients keep their connections (ttci/infra/web_server.py, the cheroot engine the
scheduler serves with): 40 clients each polling on one keep-alive connection are all answered
on the connection they opened, with no `Connection: close`, up to the server's connection
limit; past it, the extra clients are told to reconnect and still get their answers.

cheroot keeps 10 idle keep-alive connections by default: the 11th client's every answer said
`Connection: close`, so most of 50 polling clients paid a new TCP connection per request (the
scheduler's read p99 doubled; bench/scheduler.py measures it)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator

import pytest
from flask import Flask, jsonify

from ttci.infra.web_server import WebServer, make_server

CLIENTS = 40


def _app() -> Flask:
    app = Flask("keep-alive")
    app.add_url_rule("/v1/status", "status", lambda: jsonify({"ok": True}))
    return app


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[WebServer]:
    limit: int = request.param
    srv = make_server(
        _app(), "127.0.0.1", 0, name="t", engine="cheroot", connection_limit=limit, threads=8
    )
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    yield srv
    srv.close()
    t.join(10)


def _poll(srv: WebServer, rounds: int = 3) -> list[tuple[int, str, bool]]:
    """Every client asks once per round (all connections open at once); per answer: status,
    its Connection header, and whether it came on the client's first connection."""
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(CLIENTS)]
    first: list[object] = []
    out = []
    try:
        for r in range(rounds):
            for i, c in enumerate(conns):
                c.request("GET", "/v1/status")
                resp = c.getresponse()
                resp.read()
                if r == 0:
                    first.append(c.sock)
                out.append((resp.status, resp.getheader("Connection", ""), c.sock is first[i]))
    finally:
        for c in conns:
            c.close()
    return out


@pytest.mark.parametrize("server", [1000], indirect=True)
def test_forty_polling_clients_keep_their_connections(server: WebServer) -> None:
    answers = _poll(server)
    assert {status for status, _, _ in answers} == {200}
    closed = [a for a in answers if a[1].lower() == "close"]
    assert not closed, f"{len(closed)} of {len(answers)} answers closed their connection"
    assert all(same for _, _, same in answers), "a client had to reconnect"


@pytest.mark.parametrize("server", [5], indirect=True)
def test_past_the_connection_limit_clients_reconnect_and_are_answered(server: WebServer) -> None:
    answers = _poll(server)
    assert {status for status, _, _ in answers} == {200}
    assert any(a[1].lower() == "close" for a in answers), "the limit of 5 was not applied"
