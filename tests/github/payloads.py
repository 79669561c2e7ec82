"""GitHub's real `workflow_job` payloads (@octokit/webhooks-examples), aimed at our labels and
signed as GitHub signs them; sent with GitHub's headers."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tools/node_modules/@octokit/webhooks-examples/api.github.com/index.json"


@functools.cache
def _examples() -> list[dict[str, Any]]:
    data = json.loads(EXAMPLES.read_text())
    [entry] = [e for e in data if e["name"] == "workflow_job"]
    out: list[dict[str, Any]] = entry["examples"]
    return out


def example(
    action: str,
    status: str | None = None,
    *,
    installation: bool | None = None,
    conclusion: str | None = None,
) -> dict[str, Any]:
    """A deep copy of GitHub's example for (action, status), chosen by content, not index."""
    for ex in _examples():
        j = ex["workflow_job"]
        if ex["action"] != action or (status and j["status"] != status):
            continue
        if installation is not None and ("installation" in ex) != installation:
            continue
        if conclusion is not None and j.get("conclusion") != conclusion:
            continue
        return copy.deepcopy(ex)
    raise LookupError(f"no workflow_job example with action={action} status={status}")


def now_iso(offset_s: float = 0) -> str:
    t = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def job_event(
    action: str,
    job_id: int,
    labels: list[str],
    *,
    repo: str = "octo-org/hello",
    installation_id: int | None = 4242,
    runner_name: str | None = None,
    conclusion: str | None = None,
    status: str | None = None,
    age_s: float = 0,
) -> dict[str, Any]:
    """GitHub's example payload for action, re-aimed at one of our jobs (id, labels, repo,
    fresh times); everything else stays as GitHub sent it."""
    ex = example(action, status, installation=True if action != "completed" else None)
    j = ex["workflow_job"]
    j["id"] = job_id
    j["labels"] = labels
    j["html_url"] = f"https://github.com/{repo}/actions/runs/{j['run_id']}/job/{job_id}"
    j["runner_name"] = runner_name
    j["created_at"] = now_iso(-age_s - 1)
    if action in ("in_progress", "completed"):
        j["started_at"] = now_iso(-age_s)
    if action == "completed":
        j["completed_at"] = now_iso(-age_s)
        j["conclusion"] = conclusion or j.get("conclusion") or "success"
    owner, name = repo.split("/")
    ex["repository"]["full_name"] = repo
    ex["repository"]["name"] = name
    ex["repository"]["owner"]["login"] = owner
    if installation_id is None:
        ex.pop("installation", None)
    else:
        ex.setdefault("installation", {"id": installation_id, "node_id": "MDIz"})
        ex["installation"]["id"] = installation_id
    return ex


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def headers(
    event: str, body: bytes, secret: bytes | None, delivery: str | None = None
) -> dict[str, str]:
    """The headers GitHub sends with a delivery (docs: webhook events and payloads)."""
    h = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/8e03811",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182",
        "X-GitHub-Hook-Installation-Target-Type": "integration",
        "X-GitHub-Hook-Installation-Target-ID": "79929171",
    }
    if secret is not None:
        h["X-Hub-Signature-256"] = sign(secret, body)
    return h


def deliver(
    url: str,
    payload: Any,
    secret: bytes | None,
    *,
    event: str = "workflow_job",
    delivery: str | None = None,
    body: bytes | None = None,
) -> requests.Response:
    """POST one delivery the way GitHub does (compact JSON, signature over the exact bytes)."""
    raw = body if body is not None else json.dumps(payload, separators=(",", ":")).encode()
    return requests.post(url, data=raw, headers=headers(event, raw, secret, delivery), timeout=10)
