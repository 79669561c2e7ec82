"""Our GitHub adapter driven through real PyGithub against the loopback GitHub built from
GitHub's OpenAPI description: App JWT -> installation token (cached until expiry), JIT configs
at repo and org level, runner clean-up, job status, rate limits. The stand-in rejects what
GitHub would reject, so wrong paths, methods, bodies or credentials fail here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.github.standin import StandIn
from tests.github.util import app_keys
from webhooks.github_api import GitHubAPI, GitHubConfig, GitHubError, RateLimited

LABELS = ["self-hosted", "tt", "debian-12", "arm64"]
REPO = "octo-org/hello"
TOKEN = "ghp_statictoken1234"
WRONG = "ghp_wrong"


@pytest.fixture(scope="module")
def gh() -> Iterator[StandIn]:
    _, public = app_keys()
    s = StandIn(app_id=31337, public_key=public, token=TOKEN).start()
    s.installations["octo-org"] = 4242
    yield s
    s.stop()


@pytest.fixture
def new_api(gh: StandIn) -> Iterator[Callable[..., GitHubAPI]]:
    """Make adapters on the stand-in (the App by default); their connections close after."""
    made: list[GitHubAPI] = []

    def make(**kw: Any) -> GitHubAPI:
        if "token" not in kw:
            kw = {"app_id": "31337", "private_key": app_keys()[0], **kw}
        made.append(GitHubAPI(GitHubConfig(base_url=gh.url, **kw)))
        return made[-1]

    yield make
    for api in made:
        api.close()


def test_app_auth_jit_config_at_repo_level(gh: StandIn, new_api: Callable[..., GitHubAPI]) -> None:
    api = new_api()
    before = len(gh.calls("apps/create-installation-access-token"))
    jit = api.create_jit_runner(REPO, None, "tt-101-1", LABELS)
    assert jit.name == "tt-101-1" and jit.encoded_jit_config == gh.issued["tt-101-1"]
    runner = gh.runners[REPO]["tt-101-1"]
    assert [label["name"] for label in runner["labels"]] == LABELS
    # JWT for the installation lookup and the token; the installation token for the rest
    [lookup] = gh.calls("apps/get-repo-installation")[-1:]
    assert lookup.auth == "jwt"
    [post] = gh.calls("actions/generate-runner-jitconfig-for-repo")[-1:]
    assert post.auth == "installation"
    assert post.body == {
        "name": "tt-101-1",
        "runner_group_id": 1,
        "labels": LABELS,
        "work_folder": "_work",
    }
    # the installation token is cached: more calls, no new token
    api.create_jit_runner(REPO, 4242, "tt-102-1", LABELS)
    api.job_status(REPO, 4242, 5)
    assert len(gh.calls("apps/create-installation-access-token")) == before + 1


def test_installation_token_is_renewed_when_it_expires(
    gh: StandIn, new_api: Callable[..., GitHubAPI]
) -> None:
    gh.token_ttl = 22.0  # PyGithub renews 20 s before expiry
    try:
        api = new_api()
        n = len(gh.calls("apps/create-installation-access-token"))
        api.create_jit_runner(REPO, 4242, "tt-103-1", LABELS)
        api.create_jit_runner(REPO, 4242, "tt-104-1", LABELS)
        assert len(gh.calls("apps/create-installation-access-token")) == n + 1
        time.sleep(2.5)
        api.create_jit_runner(REPO, 4242, "tt-105-1", LABELS)
        assert len(gh.calls("apps/create-installation-access-token")) == n + 2
    finally:
        gh.token_ttl = 3600.0


def test_org_level_jit_config_with_a_token(gh: StandIn, new_api: Callable[..., GitHubAPI]) -> None:
    api = new_api(token=TOKEN, scope="org")
    jit = api.create_jit_runner(REPO, None, "tt-201-1", LABELS)
    assert jit.encoded_jit_config == gh.issued["tt-201-1"]
    assert "tt-201-1" in gh.runners["octo-org"]
    assert api.find_runner(REPO, None, "tt-201-1") == jit.runner_id
    api.delete_runner(REPO, None, jit.runner_id)
    assert "tt-201-1" not in gh.runners["octo-org"]
    api.delete_runner(REPO, None, jit.runner_id)  # already gone: fine


def test_github_rejects_what_it_would_reject(
    gh: StandIn, new_api: Callable[..., GitHubAPI]
) -> None:
    api = new_api(token=TOKEN)
    with pytest.raises(GitHubError, match="should be non-empty") as e:
        api.create_jit_runner(REPO, None, "tt-301-1", [])
    assert e.value.status == 422
    api.create_jit_runner(REPO, None, "tt-302-1", LABELS)
    with pytest.raises(GitHubError, match="Already exists") as e:
        api.create_jit_runner(REPO, None, "tt-302-1", LABELS)
    assert e.value.status == 409
    bad = new_api(token=WRONG)
    with pytest.raises(GitHubError, match=r"401.*Bad credentials") as e:
        bad.create_jit_runner(REPO, None, "tt-303-1", LABELS)
    assert e.value.hint and "token" in e.value.hint
    # raw requests the stand-in refuses as GitHub does
    url = f"{gh.url}/repos/{REPO}/actions/runners/generate-jitconfig"
    auth = {"Authorization": f"token {TOKEN}"}
    assert (
        requests.post(url, json={"name": "x", "labels": ["a"]}, headers=auth, timeout=5).status_code
        == 422
    )  # runner_group_id missing
    assert requests.post(url, data="{", headers=auth, timeout=5).status_code == 400
    assert requests.get(url, headers=auth, timeout=5).status_code == 404  # wrong method
    assert requests.post(url, json={}, timeout=5).status_code == 401
    r = requests.get(f"{gh.url}/repos/{REPO}/actions/jobs/abc", headers=auth, timeout=5)
    assert r.status_code == 404
    r = requests.get(f"{gh.url}/repos/{REPO}/actions/runs?status=bogus", headers=auth, timeout=5)
    assert r.status_code == 422


def test_app_with_a_wrong_key_is_refused(gh: StandIn, new_api: Callable[..., GitHubAPI]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    api = new_api(private_key=other)
    with pytest.raises(GitHubError, match="JSON web token could not be decoded"):
        api.create_jit_runner("someone/else", None, "tt-401-1", LABELS)


def test_job_status_and_queued_jobs(gh: StandIn, new_api: Callable[..., GitHubAPI]) -> None:
    api = new_api()
    gh.add_job(REPO, 9001, LABELS, "queued")
    gh.add_job(REPO, 9002, ["ubuntu-latest"], "queued")
    gh.add_job(REPO, 9003, LABELS, "completed")
    assert api.job_status(REPO, 4242, 9001) == "queued"
    assert api.job_status(REPO, 4242, 9003) == "completed"
    assert api.job_status(REPO, 4242, 123456789) is None
    queued = {j["id"]: j["labels"] for j in api.queued_jobs(REPO, 4242)}
    assert queued == {9001: LABELS, 9002: ["ubuntu-latest"]}


def test_short_retry_after_is_honoured_long_one_handed_back(
    gh: StandIn, new_api: Callable[..., GitHubAPI]
) -> None:
    api = new_api()
    op = "actions/generate-runner-jitconfig-for-repo"
    gh.fail(
        op, 403, headers={"Retry-After": "1"}, message="You have exceeded a secondary rate limit."
    )
    n = len(gh.calls(op))
    t0 = time.monotonic()
    jit = api.create_jit_runner(REPO, 4242, "tt-501-1", LABELS)
    assert time.monotonic() - t0 >= 1.0 and jit.encoded_jit_config == gh.issued["tt-501-1"]
    assert len(gh.calls(op)) == n + 2
    gh.fail(op, 429, headers={"Retry-After": "600"}, message="Too many requests")
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as e:
        api.create_jit_runner(REPO, 4242, "tt-502-1", LABELS)
    assert e.value.retry_after == 600 and time.monotonic() - t0 < 30
