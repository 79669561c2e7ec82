"""The webhook service as GitHub talks to it: GitHub's own workflow_job payloads, signed as
GitHub signs them, sent to the Flask app under waitress; tampered, replayed, stale and malformed
deliveries; the state each leaves in SQLite; the launcher script with the stand-in run.sh."""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.github.payloads import deliver, example, job_event, now_iso
from tests.github.standin import StandIn
from tests.github.util import RUN_SH, app_keys, serving
from ttci.client.config import ClientConfig
from ttci.client.scheduler import Client
from webhooks.app import create_app
from webhooks.github_api import GitHubAPI, GitHubConfig
from webhooks.runner import launch_request, tar_dir
from webhooks.service import Service, Settings
from webhooks.store import JobStore

SECRET = b"webhook-secret-for-tests-3f9a"
OURS = ["self-hosted", "tt", "debian-12", "arm64"]
BIN = Path(sys.executable).parent


@dataclass
class Hook:
    url: str
    svc: Service
    gh: StandIn
    state: Path
    database: str = ""

    def send(self, payload: object, **kw: object) -> requests.Response:
        return deliver(self.url + "/webhook", payload, kw.pop("secret", SECRET), **kw)  # type: ignore[arg-type]

    def job(self, jid: int) -> dict[str, object]:
        row = self.svc.store.get(jid)
        assert row is not None, f"job {jid} not recorded"
        return row


@pytest.fixture
def hook(tmp_path: Path, database: str) -> Iterator[Hook]:
    _, public = app_keys()
    gh = StandIn(app_id=31337, public_key=public).start()
    gh.installations["octo-org"] = 4242
    api = GitHubAPI(GitHubConfig(base_url=gh.url, app_id="31337", private_key=app_keys()[0]))
    # No scheduler listens here: provisioning fails the way it does when the cloud is down.
    tt = Client(ClientConfig("127.0.0.1:9", "tt-token"))
    settings = Settings(max_waiting=4, reconcile_interval_s=3600)
    svc = Service(settings, JobStore(database or tmp_path / "github.db"), api, tt)
    with serving(create_app(svc, SECRET)) as url:
        yield Hook(url, svc, gh, tmp_path, database)
    svc.stop()
    svc.store.store.close()
    api.close()
    tt.session.close()
    gh.stop()


def test_every_github_example_is_accepted_and_none_is_ours(hook: Hook) -> None:
    """GitHub's 8 workflow_job examples, as GitHub would send them today."""
    from tests.github.payloads import _examples

    for ex in copy.deepcopy(_examples()):
        for key in ("created_at", "started_at", "completed_at"):
            if ex["workflow_job"].get(key):
                ex["workflow_job"][key] = now_iso()
        r = hook.send(ex)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "ignored"  # ubuntu-latest, k8s, gpu: not our labels
    assert hook.svc.store.recent() == []


def test_queued_job_with_our_labels_is_recorded_fast(hook: Hook) -> None:
    r = hook.send(job_event("queued", 7001, OURS))
    assert r.status_code == 202 and r.json() == {
        "status": "queued",
        "job": 7001,
        "os_prefix": "debian-12:arm64",
    }
    row = hook.job(7001)
    assert row["state"] == "pending" and row["repo"] == "octo-org/hello"
    assert row["installation_id"] == 4242 and row["labels"] == OURS
    # the same job again under a new delivery id: known, nothing new
    assert hook.send(job_event("queued", 7001, OURS)).json()["status"] == "known"


def test_queued_action_with_waiting_status_is_acted_on(hook: Hook) -> None:
    """GitHub's example 6: action queued, workflow_job.status waiting (deployment gate)."""
    ev = job_event("queued", 7002, OURS, status="waiting")
    assert ev["workflow_job"]["status"] == "waiting" and "deployment" in ev
    assert hook.send(ev).json()["status"] == "queued"
    assert hook.job(7002)["state"] == "pending"


def test_tampered_unsigned_and_wrongly_signed_deliveries_are_refused(hook: Hook) -> None:
    ev = job_event("queued", 7003, OURS)
    raw = json.dumps(ev, separators=(",", ":")).encode()
    from tests.github.payloads import headers

    h = headers("workflow_job", raw, SECRET)
    tampered = raw.replace(b'"debian-12"', b'"debian-13"')
    r = requests.post(hook.url + "/webhook", data=tampered, headers=h, timeout=5)
    assert r.status_code == 401 and "does not match" in r.json()["error"]
    r = hook.send(ev, secret=None)
    assert r.status_code == 401 and "no X-Hub-Signature-256" in r.json()["error"]
    r = hook.send(ev, secret=b"not-the-secret")
    assert r.status_code == 401 and r.json()["hint"]
    assert hook.svc.store.get(7003) is None


def test_replayed_delivery_is_refused(hook: Hook) -> None:
    ev = job_event("queued", 7004, OURS)
    assert hook.send(ev, delivery="6f3a1c2e-0d7b-11f0-8a5e-1c2b3d4e5f60").status_code == 202
    r = hook.send(ev, delivery="6f3a1c2e-0d7b-11f0-8a5e-1c2b3d4e5f60")
    assert r.status_code == 409 and "already received" in r.json()["error"]
    metrics = requests.get(hook.url + "/metrics", timeout=5).text
    assert 'ttci_github_deliveries_total{event="workflow_job",outcome="replay"} 1.0' in metrics
    assert 'ttci_github_deliveries_total{event="workflow_job",outcome="queued"} 1.0' in metrics


def test_stale_delivery_is_refused(hook: Hook) -> None:
    ev = example("queued", "queued", installation=True)  # GitHub's own, dated 2021
    ev["workflow_job"]["labels"] = OURS
    r = hook.send(ev)
    assert r.status_code == 409 and "stale delivery" in r.json()["error"]
    assert hook.send(job_event("queued", 7005, OURS, age_s=7200)).status_code == 409
    assert hook.svc.store.get(7005) is None


def test_malformed_and_foreign_deliveries(hook: Hook) -> None:
    r = hook.send(None, body=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = hook.send({"action": "queued"})
    assert r.status_code == 400 and "workflow_job" in r.json()["error"]
    r = hook.send({"zen": "Keep it logically awesome.", "hook_id": 1}, event="ping")
    assert r.status_code == 200 and r.json()["status"] == "pong"
    r = hook.send({"ref": "refs/heads/main"}, event="push")
    assert r.status_code == 202 and "not handled" in r.json()["reason"]
    raw = b"payload=%7B%7D"
    from tests.github.payloads import headers

    h = {
        **headers("workflow_job", raw, SECRET),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    r = requests.post(hook.url + "/webhook", data=raw, headers=h, timeout=5)
    assert r.status_code == 415 and "application/json" in r.json()["hint"]
    h = headers("workflow_job", b"{}", SECRET)
    del h["X-GitHub-Delivery"]
    r = requests.post(hook.url + "/webhook", data=b"{}", headers=h, timeout=5)
    assert r.status_code == 400 and "X-GitHub-Delivery" in r.json()["error"]


def test_unservable_job_is_kept_and_shown(hook: Hook) -> None:
    r = hook.send(job_event("queued", 7006, ["self-hosted", "tt", "debian-12", "arm64", "gpu"]))
    assert r.status_code == 202 and r.json()["status"] == "unservable"
    assert "gpu" in hook.job(7006)["reason"]  # type: ignore[operator]
    listed = requests.get(hook.url + "/jobs?state=unservable", timeout=5).json()
    assert [j["id"] for j in listed] == [7006] and "gpu" in listed[0]["reason"]
    out = subprocess.run(
        [
            BIN / "tt-github-webhooks",
            "jobs",
            "--state-dir",
            str(hook.state),
            *(["--database", hook.database] if hook.database else []),
            "--state",
            "unservable",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "7006" in out.stdout and "unservable" in out.stdout and "gpu" in out.stdout


def test_in_progress_and_completed_without_a_queued_delivery(hook: Hook) -> None:
    r = hook.send(job_event("in_progress", 7007, OURS, runner_name="tt-7007-1"))
    assert r.status_code == 202
    assert hook.job(7007)["state"] == "in_progress" and hook.job(7007)["took_runner"] == "tt-7007-1"
    r = hook.send(job_event("completed", 7007, OURS, runner_name="tt-7007-1", conclusion="failure"))
    assert r.status_code == 202
    deadline = time.monotonic() + 10
    while hook.job(7007)["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hook.job(7007)["state"] == "done" and hook.job(7007)["conclusion"] == "failure"


def test_vm_failure_leaves_the_job_queued_and_no_runner_behind(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hook.send(job_event("queued", 7008, OURS))
    assert hook.svc.dispatch_once() == 1
    deadline = time.monotonic() + 20
    while hook.job(7008)["state"] != "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    row = hook.job(7008)
    assert row["state"] == "pending" and row["attempt"] == 1
    assert "cannot reach the scheduler" in row["reason"]  # type: ignore[operator]
    assert row["not_before"] > time.time()  # type: ignore[operator]
    # no capacity was ever granted, so no JIT runner was asked for: none to leave behind
    assert hook.gh.calls("actions/generate-runner-jitconfig-for-repo") == []
    assert not hook.gh.runners.get("octo-org/hello")
    # secrets never reach the log
    text = caplog.text
    assert SECRET.decode() not in text
    assert not any(tok in text for tok in hook.gh.tokens)


def test_at_most_max_waiting_jobs_are_handed_to_tt_ci(hook: Hook) -> None:
    """--max-waiting 4: the fifth pending job stays here and says why (the old --max-vms and
    --max-per-owner limits are TT CI's quotas now)."""
    for jid in (7101, 7102, 7103, 7104):  # four already wait in TT CI's queue
        hook.send(job_event("queued", jid, OURS))
        hook.svc._in_queue[jid] = "octo-org/hello"
    hook.send(job_event("queued", 7105, OURS, repo="other-org/app"))
    assert hook.svc.dispatch_once() == 0
    assert hook.job(7105)["state"] == "pending"
    assert "--max-waiting" in hook.job(7105)["reason"]  # type: ignore[operator]
    hook.svc._in_queue.clear()


@pytest.mark.parametrize("mode", ["env", "argv"])
def test_launcher_hands_the_jit_config_to_run_sh(tmp_path: Path, mode: str) -> None:
    """The launch request as the agent runs it, with the stand-in run.sh, on this host: in env
    mode the runner directory comes as a tar after the JIT config (--push-runner), in argv
    mode it is already there (baked into the image)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.sh").write_bytes(RUN_SH.read_bytes())
    (src / "run.sh").chmod(0o755)
    runner = tmp_path / "opt" / "actions-runner"
    if mode == "argv":
        shutil.copytree(src, runner)
    record, flag = Path("/tmp/tt-runner-record"), Path("/tmp/tt-runner-exit")
    record.unlink(missing_ok=True)
    flag.unlink(missing_ok=True)
    jit = base64.b64encode(b'{"nonce": "' + os.urandom(8).hex().encode() + b'"}').decode()
    req = launch_request(str(runner), mode, jit, tar_dir(src) if mode == "env" else None).to_dict()
    p = subprocess.Popen(
        req["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdin is not None
    p.stdin.write(base64.b64decode(req["stdin_b64"]))
    p.stdin.close()
    try:
        deadline = time.monotonic() + 10
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        fields = dict(line.split("=", 1) for line in record.read_text().splitlines())
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if mode == "env":
            assert fields["env_jit"] == jit and fields["argv"] == ""
            assert jit not in cmdline  # not in the process list
        else:
            assert fields["arg_jit"] == jit and fields["env_jit"] == ""
            assert jit in cmdline  # the trade-off of argv mode, documented in --jit-via
        assert fields["pwd"] == str(runner) and fields["allow_root"] == "1"
    finally:
        flag.write_text("0")
        assert p.stdout is not None and p.stderr is not None
        with p.stdout, p.stderr:
            out, err = p.stdout.read(), p.stderr.read()
        p.wait(timeout=10)
        flag.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    assert p.returncode == 0, err
    assert b"ttci: starting" in err and b"stand-in runner: exiting" in out


def test_store_columns_and_migrations(tmp_path: Path) -> None:
    from webhooks.store import JOB_COLUMNS

    store = JobStore(tmp_path / "g.db")
    assert set(store.db.columns_of("jobs")) == JOB_COLUMNS
    assert store.store.applied() == ["0001_jobs_deliveries", "0002_launched_at", "0003_leases"]
    with pytest.raises(ValueError, match="unknown job columns"):
        store.update(1, **{"state; drop table jobs": "x"})
    store.store.close()
