"""A loopback GitHub REST API built from GitHub's own OpenAPI description (@octokit/openapi).

Every route of api.github.com exists here with GitHub's methods; a request is matched to its
operation, its path and query parameters and JSON body are validated against the operation's
schemas (a request GitHub would reject gets GitHub's 404/422 here too), its credentials are
checked the way GitHub checks them (App JWT for the App's endpoints, a token elsewhere), and the
answer is GitHub's example response for the operation. A few operations keep state (App
installations and tokens, JIT runners, workflow runs and jobs) so a real PyGithub can be driven
through whole flows. Serves on 127.0.0.1 only (werkzeug's server, no DNS lookups).
"""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jwt
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tools/node_modules/@octokit/openapi/generated/api.github.com.deref.json"
METHODS = ("get", "post", "put", "patch", "delete")
APP_JWT_OPS = {
    "apps/get-authenticated",
    "apps/get-repo-installation",
    "apps/get-org-installation",
    "apps/get-user-installation",
    "apps/list-installations",
    "apps/get-installation",
    "apps/create-installation-access-token",
}


@functools.cache
def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC.read_text())
    return spec


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    regex: re.Pattern[str]
    op: dict[str, Any]

    @property
    def op_id(self) -> str:
        return str(self.op["operationId"])


@functools.cache
def routes() -> list[Route]:
    out = []
    for template, item in load_spec()["paths"].items():
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        for method in METHODS:
            if method in item:
                out.append(
                    Route(method.upper(), template, re.compile(f"^{pattern}$"), item[method])
                )
    # literal segments win over parameters: .../runners/generate-jitconfig before .../{runner_id}
    out.sort(key=lambda r: (r.template.count("{"), -len(r.template)))
    return out


@dataclass
class Fault:
    op_id: str
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    remaining: int


@dataclass
class Seen:
    method: str
    path: str
    op_id: str
    body: Any
    auth: str  # "jwt", "installation", "token"
    at: float = field(default_factory=time.time)


class GitHubError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _example(op: dict[str, Any], status: str | None = None) -> tuple[int, Any]:
    codes = [c for c in op["responses"] if c.startswith("2")]
    code = status or (codes[0] if codes else "200")
    resp = op["responses"].get(code, {})
    content = resp.get("content", {}).get("application/json", {})
    if "examples" in content:
        first = next(iter(content["examples"].values()))
        return int(code), copy.deepcopy(first.get("value"))
    if "example" in content:
        return int(code), copy.deepcopy(content["example"])
    return int(code), None


def _coerce(value: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "integer":
        return int(value) if re.fullmatch(r"-?\d+", value) else value
    if kind == "boolean":
        return {"true": True, "false": False}.get(value, value)
    return value


class StandIn:
    """GitHub on 127.0.0.1. Register an App (id + public key), tokens, installations, jobs."""

    def __init__(self, *, app_id: int = 0, public_key: str = "", token: str = "") -> None:
        self.app_id = app_id
        self.public_key = public_key
        self.pats = {token} if token else set()
        self.installations: dict[str, int] = {}  # owner -> installation id
        self.tokens: dict[str, tuple[int, float]] = {}  # installation token -> (inst, expiry)
        self.runners: dict[str, dict[str, dict[str, Any]]] = {}  # scope -> name -> runner
        self.issued: dict[str, str] = {}  # runner name -> encoded_jit_config we issued
        self.jobs: dict[int, dict[str, Any]] = {}  # job id -> {repo, run_id, status, labels}
        self.faults: list[Fault] = []
        self.token_ttl = 3600.0  # seconds an installation token lives
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._ids = itertools.count(1000)
        self.url = ""
        self._server: Any = None

    # -- the test's side -------------------------------------------------------------------
    def start(self) -> StandIn:
        routes()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = make_server("127.0.0.1", 0, self, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def add_job(self, repo: str, job_id: int, labels: list[str], status: str = "queued") -> None:
        with self.lock:
            self.jobs[job_id] = {
                "repo": repo,
                "run_id": job_id // 10 + 7,
                "status": status,
                "labels": labels,
            }

    def fail(
        self,
        op_id: str,
        status: int,
        *,
        headers: dict[str, str] | None = None,
        message: str = "",
        count: int = 1,
    ) -> None:
        """The next `count` calls of op_id get this answer (rate limits, outages)."""
        body = {"message": message, "documentation_url": "https://docs.github.com/rest"}
        self.faults.append(Fault(op_id, status, headers or {}, body, count))

    def calls(self, op_id: str) -> list[Seen]:
        return [s for s in self.seen if s.op_id == op_id]

    # -- WSGI ---------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        try:
            status, body, hdrs = self._handle(req)
        except GitHubError as e:
            status, hdrs = e.status, e.headers
            body = {
                "message": e.message,
                "documentation_url": "https://docs.github.com/rest",
                "status": str(e.status),
            }
        text = "" if body is None else json.dumps(body).replace("https://api.github.com", self.url)
        resp = Response(
            text, status=status, headers=hdrs, content_type="application/json; charset=utf-8"
        )
        return resp(environ, start_response)

    def _match(self, req: Request) -> tuple[Route, dict[str, Any]]:
        path = req.path.rstrip("/") or "/"
        allowed = []
        for r in routes():
            m = r.regex.match(path)
            if not m:
                continue
            if r.method != req.method:
                allowed.append(r.method)
                continue
            return r, m.groupdict()
        if allowed:
            raise GitHubError(404, "Not Found")  # GitHub answers 404 to a wrong method too
        raise GitHubError(404, "Not Found")

    def _validate(
        self, route: Route, params: dict[str, str], req: Request
    ) -> tuple[dict[str, Any], Any]:
        values: dict[str, Any] = {}
        for p in route.op.get("parameters", []):
            where, name, schema = p["in"], p["name"], p.get("schema", {})
            raw = params.get(name) if where == "path" else req.args.get(name)
            if raw is None:
                if p.get("required") and where == "query":
                    raise GitHubError(422, f"Invalid request. {name} wasn't supplied.")
                continue
            value = _coerce(raw, schema)
            try:
                jsonschema.validate(value, schema)
            except jsonschema.ValidationError as e:
                if where == "path":
                    raise GitHubError(404, "Not Found") from e
                raise GitHubError(422, f"Invalid request. {name}: {e.message}") from e
            values[name] = value
        body: Any = None
        rb = route.op.get("requestBody")
        data = req.get_data()
        if rb and "application/json" in rb.get("content", {}):
            if not data:
                if rb.get("required"):
                    raise GitHubError(400, "Problems parsing JSON")
            else:
                try:
                    body = json.loads(data)
                except ValueError as e:
                    raise GitHubError(400, "Problems parsing JSON") from e
                schema = rb["content"]["application/json"]["schema"]
                errors = sorted(
                    jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path)
                )
                if errors:
                    msgs = "; ".join(
                        f"{'/'.join(map(str, e.path)) or 'body'}: {e.message}" for e in errors
                    )
                    raise GitHubError(422, f"Invalid request. {msgs}")
        return values, body

    def _auth(self, route: Route, req: Request) -> str:
        header = req.headers.get("Authorization", "")
        scheme, _, cred = header.partition(" ")
        if not cred:
            raise GitHubError(401, "Requires authentication")
        if route.op_id in APP_JWT_OPS:
            if scheme.lower() != "bearer":
                raise GitHubError(401, "A JSON web token could not be decoded")
            try:
                claims = jwt.decode(
                    cred,
                    self.public_key,
                    algorithms=["RS256"],
                    options={"require": ["exp", "iat", "iss"]},
                )
            except jwt.PyJWTError as e:
                raise GitHubError(401, f"A JSON web token could not be decoded: {e}") from e
            if str(claims["iss"]) != str(self.app_id):
                raise GitHubError(401, "Integration not found")
            if claims["exp"] - time.time() > 600 + 5:
                raise GitHubError(401, "'Expiration time' claim ('exp') is too far in the future")
            return "jwt"
        if cred in self.pats:
            return "token"
        inst = self.tokens.get(cred)
        if inst is None:
            if cred.count(".") == 2:  # a JWT where a token belongs
                raise GitHubError(403, "Resource not accessible by integration")
            raise GitHubError(401, "Bad credentials")
        if inst[1] < time.time():
            raise GitHubError(401, "Bad credentials")
        return "installation"

    def _handle(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        route, params = self._match(req)
        auth = self._auth(route, req)  # GitHub checks credentials before the request
        values, body = self._validate(route, params, req)
        with self.lock:
            self.seen.append(Seen(req.method, req.path, route.op_id, body, auth))
            for f in self.faults:
                if f.op_id == route.op_id and f.remaining > 0:
                    f.remaining -= 1
                    return f.status, f.body, f.headers
        handler = getattr(self, "_op_" + re.sub(r"\W", "_", route.op_id), None)
        if handler is None:
            status, example = _example(route.op)
            return status, example, {}
        with self.lock:
            return handler(route, values, body)  # type: ignore[no-any-return]

    # -- stateful operations ------------------------------------------------------------------
    def _installation_for(self, route: Route, owner: str) -> tuple[int, Any, dict[str, str]]:
        if owner not in self.installations:
            raise GitHubError(404, "Not Found")
        status, ex = _example(route.op)
        ex["id"] = self.installations[owner]
        ex["app_id"] = self.app_id
        ex["account"]["login"] = owner
        return status, ex, {}

    def _op_apps_get_repo_installation(self, route: Route, v: dict[str, Any], body: Any) -> Any:
        return self._installation_for(route, v["owner"])

    def _op_apps_get_org_installation(self, route: Route, v: dict[str, Any], body: Any) -> Any:
        return self._installation_for(route, v["org"])

    def _op_apps_create_installation_access_token(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        if v["installation_id"] not in self.installations.values():
            raise GitHubError(404, "Not Found")
        status, ex = _example(route.op)
        token = "ghs_" + secrets.token_hex(18)
        expires = time.time() + self.token_ttl
        self.tokens[token] = (v["installation_id"], expires)
        ex["token"] = token
        ex["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        return status, ex, {}

    def _jit(self, route: Route, scope: str, body: dict[str, Any]) -> Any:
        runners = self.runners.setdefault(scope, {})
        if body["name"] in runners:
            raise GitHubError(
                409, f"Already exists - A runner with the name {body['name']} already exists."
            )
        status, ex = _example(route.op)
        rid = next(self._ids)
        labels = [
            {"id": i + 1, "name": n, "type": "read-only" if n == "self-hosted" else "custom"}
            for i, n in enumerate(body["labels"])
        ]
        runner = {
            **ex["runner"],
            "id": rid,
            "name": body["name"],
            "labels": labels,
            "status": "offline",
            "busy": False,
            "ephemeral": True,
            "runner_group_id": body["runner_group_id"],
        }
        runners[body["name"]] = runner
        config = base64.b64encode(
            json.dumps(
                {
                    ".runner": {"agentName": body["name"], "agentId": rid},
                    "nonce": secrets.token_hex(16),
                }
            ).encode()
        ).decode()
        self.issued[body["name"]] = config
        return status, {"runner": runner, "encoded_jit_config": config}, {}

    def _op_actions_generate_runner_jitconfig_for_repo(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._jit(route, f"{v['owner']}/{v['repo']}", body)

    def _op_actions_generate_runner_jitconfig_for_org(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._jit(route, v["org"], body)

    def _op_orgs_get(self, route: Route, v: dict[str, Any], body: Any) -> Any:
        status, ex = _example(route.op)
        ex.update(login=v["org"], url=f"https://api.github.com/orgs/{v['org']}")
        return status, ex, {}

    def _list_runners(self, scope: str) -> Any:
        rs = list(self.runners.get(scope, {}).values())
        return 200, {"total_count": len(rs), "runners": rs}, {}

    def _op_actions_list_self_hosted_runners_for_repo(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._list_runners(f"{v['owner']}/{v['repo']}")

    def _op_actions_list_self_hosted_runners_for_org(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._list_runners(v["org"])

    def _delete_runner(self, scope: str, rid: int) -> Any:
        for name, r in list(self.runners.get(scope, {}).items()):
            if r["id"] == rid:
                del self.runners[scope][name]
                return 204, None, {}
        raise GitHubError(404, "Not Found")

    def _op_actions_delete_self_hosted_runner_from_repo(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._delete_runner(f"{v['owner']}/{v['repo']}", v["runner_id"])

    def _op_actions_delete_self_hosted_runner_from_org(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        return self._delete_runner(v["org"], v["runner_id"])

    def _job_json(self, route_op: dict[str, Any], jid: int) -> dict[str, Any]:
        j = self.jobs[jid]
        _, ex = _example(route_op)
        if "jobs" in ex:
            ex = ex["jobs"][0]
        ex.update(
            id=jid,
            run_id=j["run_id"],
            status=j["status"],
            labels=j["labels"],
            url=f"https://api.github.com/repos/{j['repo']}/actions/jobs/{jid}",
            html_url=f"https://github.com/{j['repo']}/actions/runs/{j['run_id']}/job/{jid}",
        )
        if j["status"] != "completed":
            ex["conclusion"] = None
        return ex

    def _op_actions_get_job_for_workflow_run(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        jid = v["job_id"]
        if jid not in self.jobs or self.jobs[jid]["repo"] != f"{v['owner']}/{v['repo']}":
            raise GitHubError(404, "Not Found")
        return 200, self._job_json(route.op, jid), {}

    def _op_actions_list_workflow_runs_for_repo(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        repo = f"{v['owner']}/{v['repo']}"
        _, ex = _example(route.op)
        template = ex["workflow_runs"][0]
        runs: dict[int, dict[str, Any]] = {}
        for j in self.jobs.values():
            if j["repo"] != repo or (v.get("status") and j["status"] != v["status"]):
                continue
            base = f"https://api.github.com/repos/{repo}/actions/runs/{j['run_id']}"
            runs[j["run_id"]] = {
                **template,
                "id": j["run_id"],
                "status": j["status"],
                "url": base,
                "jobs_url": base + "/jobs",
            }
        return 200, {"total_count": len(runs), "workflow_runs": list(runs.values())}, {}

    def _op_actions_list_jobs_for_workflow_run(
        self, route: Route, v: dict[str, Any], body: Any
    ) -> Any:
        repo = f"{v['owner']}/{v['repo']}"
        jobs = [
            self._job_json(
                load_spec()["paths"]["/repos/{owner}/{repo}/actions/jobs/{job_id}"]["get"], jid
            )
            for jid, j in self.jobs.items()
            if j["repo"] == repo and j["run_id"] == v["run_id"]
        ]
        return 200, {"total_count": len(jobs), "jobs": jobs}, {}
