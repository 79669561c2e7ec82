"""The OpenAPI 3.1 descriptions of the scheduler and hostd match their real Flask routes: every
route is documented, every documented path exists, methods match, the open routes are the ones
the description marks open; the documents are valid OpenAPI 3.1 and valid JSON Schema, and both
services serve theirs at /v1/openapi.json without a token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from flask import Flask
from schemathesis.specs.openapi.definitions import OPENAPI_31

from hostd.service import api as hostd_api
from ttci.scheduler.service import Scheduler
from ttci.scheduler.web import api as sched_api
from ttci.wire.openapi_hostd import hostd_openapi
from ttci.wire.openapi_scheduler import scheduler_openapi

ADMIN = "admin-" + "a" * 30
METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture(scope="module")
def sched_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    s = Scheduler(tmp_path_factory.mktemp("openapi"), {}, admin_token=ADMIN, host_timeout=3600)
    yield sched_api.create_app(s)
    s.stop()


@pytest.fixture(scope="module")
def hostd_app() -> Flask:
    return hostd_api.create_app(cast(Any, object()), "hostd-token-" + "t" * 20)  # routes only


def _routes(app: Flask) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every Flask route (HEAD and OPTIONS are Flask's own)."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        out |= {(m, path) for m in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    return out


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def _open(doc: dict[str, Any], user_scheme: str) -> set[tuple[str, str]]:
    """Operations that need no user token: open ones and those with a scheme of their own."""
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS and op.get("security", doc["security"]) != [{user_scheme: []}]
    }


@pytest.mark.parametrize("which", ["scheduler", "hostd"])
def test_every_route_is_documented_and_every_documented_route_exists(
    which: str, sched_app: Flask, hostd_app: Flask
) -> None:
    app, doc = (
        (sched_app, scheduler_openapi()) if which == "scheduler" else (hostd_app, hostd_openapi())
    )
    routes, documented = _routes(app), _documented(doc)
    assert routes - documented == set(), "routes missing from the description"
    assert documented - routes == set(), "documented routes that do not exist"


def _flask_open(app: Flask) -> set[tuple[str, str]]:
    """The (METHOD, OpenAPI path) pairs the app's install_auth lets through without a token."""
    return {
        (method, re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule))
        for method, rule in app.config["OPEN_ROUTES"]
    }


def test_open_routes_are_the_documented_ones(sched_app: Flask, hostd_app: Flask) -> None:
    assert _open(scheduler_openapi(), "userToken") == _flask_open(sched_app)
    assert _open(hostd_openapi(), "hostdToken") == _flask_open(hostd_app)
    assert set(sched_api.OPEN_ROUTES) <= sched_app.config["OPEN_ROUTES"]
    assert set(hostd_api.OPEN_ROUTES) <= hostd_app.config["OPEN_ROUTES"]


@pytest.mark.parametrize("doc", [scheduler_openapi(), hostd_openapi()], ids=["scheduler", "hostd"])
def test_the_description_is_valid_openapi_3_1_and_json_schema(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    schemas: list[Any] = list(doc["components"]["schemas"].values())
    for item in doc["paths"].values():
        for method, op in item.items():
            if method not in METHODS:
                continue
            schemas += [p["schema"] for p in op.get("parameters", [])]
            for content in (op.get("requestBody") or {}).get("content", {}).values():
                schemas.append(content["schema"])
            for resp in op["responses"].values():
                schemas += [c["schema"] for c in resp.get("content", {}).values()]
            assert op["responses"], op["operationId"]
    for schema in schemas:
        jsonschema.Draft202012Validator.check_schema(schema)
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for method, op in item.items()
        if method in METHODS
    ]
    assert len(ids) == len(set(ids)), "operation ids are unique"


def test_both_serve_their_description_without_a_token(sched_app: Flask, hostd_app: Flask) -> None:
    r = sched_app.test_client().get("/v1/openapi.json")
    assert r.status_code == 200 and r.json == scheduler_openapi()
    r = hostd_app.test_client().get("/v1/openapi.json")
    assert r.status_code == 200 and r.json == hostd_openapi()
    # Open for GET only: another method on the same path still needs a token.
    assert sched_app.test_client().delete("/v1/openapi.json").status_code == 401


def test_the_descriptions_are_data_in_the_repo() -> None:
    root = Path(__file__).resolve().parent.parent / "ttci" / "wire"
    for name in ("openapi.py", "openapi_scheduler.py", "openapi_envs.py", "openapi_hostd.py"):
        assert (root / name).is_file()
