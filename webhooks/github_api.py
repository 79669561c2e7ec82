"""The one adapter to GitHub's REST API, through PyGithub: App or token auth, JIT configs,
runners and job status. PyGithub's own retries are on (GithubRetry honours Retry-After); a
wait longer than we allow becomes RateLimited, so the caller can put the job back for later.
Tokens and JIT configs never reach a log or an exception message."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import github
from github import Auth, Github, GithubException, GithubIntegration, GithubRetry

from ttci.model.errors import TTError

__all__ = ["GitHubAPI", "GitHubConfig", "GitHubError", "JitRunner", "RateLimited"]

log = logging.getLogger(__name__)


class GitHubError(TTError):
    """GitHub refused or failed a request."""

    def __init__(self, message: str, *, hint: str | None = None, status: int = 0) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class RateLimited(GitHubError):
    """GitHub asked us to wait `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, hint=f"retrying after {retry_after:.0f} s", status=429)
        self.retry_after = retry_after


@dataclass(frozen=True)
class GitHubConfig:
    base_url: str = "https://api.github.com"
    token: str = ""  # a PAT or any token with administration rights on the repos/orgs
    app_id: str = ""  # or a GitHub App: id + private key (PEM)
    private_key: str = ""
    scope: str = "repo"  # where JIT runners are registered: repo or org
    runner_group_id: int = 1
    max_wait_s: float = 30.0  # longest Retry-After we sit out inside one call

    def __repr__(self) -> str:  # never print the secrets
        return (
            f"GitHubConfig(base_url={self.base_url!r}, app_id={self.app_id!r}, scope={self.scope})"
        )


@dataclass(frozen=True)
class JitRunner:
    runner_id: int
    name: str
    encoded_jit_config: str

    def __repr__(self) -> str:
        return f"JitRunner(runner_id={self.runner_id}, name={self.name!r})"


class _Retry(GithubRetry):
    """GithubRetry sleeps any Retry-After inside the call; we sit out at most
    max_rate_limit_wait and otherwise give the wait back to the caller (the job waits, not a
    thread)."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Any:
        if response is not None and response.status in (403, 429):
            value = response.headers.get("Retry-After", "")
            cap = self.max_rate_limit_wait
            if value.isdigit() and cap is not None and float(value) > cap:
                response.drain_conn()  # give the connection back to the pool: no leaked socket
                response.release_conn()
                raise github.RateLimitExceededException(
                    response.status, {"message": "rate limited"}, dict(response.headers)
                )
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _retry_after(e: GithubException) -> float:
    headers = {k.lower(): v for k, v in (e.headers or {}).items()}
    value = headers.get("retry-after")
    if value:
        try:
            return max(1.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(1.0, when.timestamp() - time.time())
    reset = headers.get("x-ratelimit-reset")
    if reset and reset.isdigit():
        return max(1.0, int(reset) - time.time() + 1)
    return 60.0


def _convert(e: Exception, what: str) -> GitHubError:
    if isinstance(e, github.RateLimitExceededException):
        wait = _retry_after(e)
        return RateLimited(f"GitHub rate-limited {what}; it asks to wait {wait:.0f} s", wait)
    if isinstance(e, GithubException):
        msg = e.message or (e.data.get("message") if isinstance(e.data, dict) else None) or ""
        if e.status == 403 and e.headers and "retry-after" in {k.lower() for k in e.headers}:
            wait = _retry_after(e)
            return RateLimited(f"GitHub rate-limited {what}; it asks to wait {wait:.0f} s", wait)
        hint = {
            401: "the token or App key is wrong or expired",
            403: "the App or token lacks permission (Administration: write for runners)",
            404: "the repository/organisation does not exist or the App is not installed on it",
            409: "a runner with that name exists; it is removed and the job retried",
            422: "GitHub rejected the request body",
        }.get(e.status)
        return GitHubError(
            f"GitHub answered {e.status} to {what}: {msg}", hint=hint, status=e.status
        )
    return GitHubError(
        f"GitHub request for {what} failed: {type(e).__name__}: {e}",
        hint="is the GitHub API reachable from this host?",
    )


class GitHubAPI:
    """A few domain calls on GitHub. Thread-safe: clients are cached per installation."""

    def __init__(self, cfg: GitHubConfig) -> None:
        if not cfg.token and not (cfg.app_id and cfg.private_key):
            raise TTError(
                "no GitHub credentials",
                hint="set TT_GH_TOKEN, or TT_GH_APP_ID with --app-key-file (a GitHub App)",
            )
        if cfg.scope not in ("repo", "org"):
            raise TTError(f"runner scope {cfg.scope!r} is unknown", hint="--scope repo or org")
        self.cfg = cfg
        self._lock = threading.Lock()
        self._clients: dict[int, Github] = {}
        self._installations: dict[str, int] = {}
        self._app = Auth.AppAuth(cfg.app_id, cfg.private_key) if cfg.app_id else None

    def _retry(self) -> GithubRetry:
        return _Retry(total=3, backoff_factor=0.2, max_rate_limit_wait=self.cfg.max_wait_s)

    def _client(self, repo: str, installation_id: int | None) -> Github:
        """A PyGithub client for repo: the token, or the App's installation token (PyGithub
        caches it and fetches a new one shortly before it expires)."""
        key = 0 if self._app is None else installation_id or self._installation(repo)
        with self._lock:
            if key not in self._clients:
                auth: Auth.Auth = (
                    Auth.Token(self.cfg.token)
                    if self._app is None
                    else self._app.get_installation_auth(key)
                )
                self._clients[key] = Github(
                    auth=auth,
                    base_url=self.cfg.base_url,
                    retry=self._retry(),
                    timeout=20,
                    lazy=True,
                )
            return self._clients[key]

    def _installation(self, repo: str) -> int:
        owner = repo.split("/", maxsplit=1)[0]
        with self._lock:
            if owner in self._installations:
                return self._installations[owner]
        if self._app is None:
            raise TTError("an installation id needs GitHub App credentials")
        gi = GithubIntegration(auth=self._app, base_url=self.cfg.base_url, retry=self._retry())
        try:
            owner_, name = repo.split("/", 1)
            inst = gi.get_repo_installation(owner_, name).id
        except Exception as e:
            raise _convert(e, f"the App installation of {repo}") from e
        finally:
            gi.close()
        with self._lock:
            self._installations[owner] = inst
        return inst

    def close(self) -> None:
        """Close every client's connections."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for g in clients:
            g.close()

    def _runners_url(self, repo: str) -> str:
        if self.cfg.scope == "org":
            return f"/orgs/{repo.split('/', maxsplit=1)[0]}/actions/runners"
        return f"/repos/{repo}/actions/runners"

    def create_jit_runner(
        self, repo: str, installation_id: int | None, name: str, labels: list[str]
    ) -> JitRunner:
        """Register a just-in-time runner (repo or org level) and return its config.

        PyGithub has org-level JIT only; the repo level goes through its requester."""
        g = self._client(repo, installation_id)
        body = {
            "name": name,
            "runner_group_id": self.cfg.runner_group_id,
            "labels": labels,
            "work_folder": "_work",
        }
        try:
            if self.cfg.scope == "org":
                org = g.get_organization(repo.split("/", maxsplit=1)[0])
                jit = org.create_self_hosted_runner_jitconfig(
                    name, self.cfg.runner_group_id, labels, work_folder="_work"
                )
                return JitRunner(jit.runner.id, jit.runner.name, jit.encoded_jit_config)
            _, data = g.requester.requestJsonAndCheck(
                "POST", f"/repos/{repo}/actions/runners/generate-jitconfig", input=body
            )
        except Exception as e:
            raise _convert(e, f"generate-jitconfig for runner {name} on {repo}") from e
        return JitRunner(
            int(data["runner"]["id"]), str(data["runner"]["name"]), str(data["encoded_jit_config"])
        )

    def delete_runner(self, repo: str, installation_id: int | None, runner_id: int) -> None:
        """Remove a registered runner; a runner GitHub no longer has is fine."""
        g = self._client(repo, installation_id)
        try:
            g.requester.requestJsonAndCheck("DELETE", f"{self._runners_url(repo)}/{runner_id}")
        except GithubException as e:
            if e.status in (404, 422):  # gone already, or busy (it ends with its job)
                return
            raise _convert(e, f"deleting runner {runner_id} of {repo}") from e
        except Exception as e:
            raise _convert(e, f"deleting runner {runner_id} of {repo}") from e

    def find_runner(self, repo: str, installation_id: int | None, name: str) -> int | None:
        """The id of the runner called name, if GitHub has one (after a 409 name conflict)."""
        g = self._client(repo, installation_id)
        try:
            _, data = g.requester.requestJsonAndCheck(
                "GET", self._runners_url(repo), parameters={"per_page": 100}
            )
        except Exception as e:
            raise _convert(e, f"listing the runners of {repo}") from e
        for r in data.get("runners", []):
            if r.get("name") == name:
                return int(r["id"])
        return None

    def job_status(self, repo: str, installation_id: int | None, job_id: int) -> str | None:
        """GitHub's status of a workflow job; None if GitHub does not know it."""
        g = self._client(repo, installation_id)
        try:
            return str(g.get_repo(repo).get_workflow_job(job_id).status)
        except GithubException as e:
            if e.status == 404:
                return None
            raise _convert(e, f"job {job_id} of {repo}") from e
        except Exception as e:
            raise _convert(e, f"job {job_id} of {repo}") from e

    def queued_jobs(self, repo: str, installation_id: int | None) -> list[dict[str, Any]]:
        """Jobs GitHub has queued in repo: {id, run_id, name, html_url, labels}."""
        g = self._client(repo, installation_id)
        out: list[dict[str, Any]] = []
        try:
            r = g.get_repo(repo)
            for run in r.get_workflow_runs(status="queued"):
                for job in run.jobs():
                    if job.status == "queued":
                        out.append(
                            {
                                "id": job.id,
                                "run_id": job.run_id,
                                "name": job.name,
                                "html_url": job.html_url,
                                "labels": list(job.labels),
                            }
                        )
        except Exception as e:
            raise _convert(e, f"the queued jobs of {repo}") from e
        return out
