"""Pure parts of the GitHub integration: signature, label scheme, job states, reconcile plan,
the runner launch request."""

from __future__ import annotations

import base64
import datetime as dt

import pytest

from ttci.model.arch import Arch
from webhooks.core import queueing, reconcile
from webhooks.core.jobs import (
    Event,
    State,
    check_delivery_id,
    env_name,
    parse_env_name,
    parse_event,
    parse_runner_name,
    result_of,
    retry_delay,
    runner_name,
    staleness,
    transition,
)
from webhooks.core.labels import jit_labels, parse_labels
from webhooks.core.signature import SignatureError, sign, verify
from webhooks.runner import LAUNCHER, launch_request

# GitHub's published test vector (docs: "Validating webhook deliveries").
VECTOR_SECRET = b"It's a Secret to Everybody"
VECTOR_BODY = b"Hello, World!"
VECTOR_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_signature_matches_githubs_test_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_BODY) == VECTOR_SIG
    verify(VECTOR_SECRET, VECTOR_BODY, VECTOR_SIG)
    verify(VECTOR_SECRET, VECTOR_BODY, VECTOR_SIG.upper().replace("SHA256", "sha256"))


@pytest.mark.parametrize(
    ("body", "header", "words"),
    [
        (b"Hello, World?", VECTOR_SIG, "does not match"),
        (VECTOR_BODY, None, "no X-Hub-Signature-256"),
        (VECTOR_BODY, "", "no X-Hub-Signature-256"),
        (VECTOR_BODY, "sha1=01234567890123456789", "not of the form"),
        (VECTOR_BODY, VECTOR_SIG[:-2], "not of the form"),
        (VECTOR_BODY, "sha256=" + "0" * 64, "does not match"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(
    body: bytes, header: str | None, words: str
) -> None:
    with pytest.raises(SignatureError, match=words) as e:
        verify(VECTOR_SECRET, body, header)
    assert e.value.hint


def test_no_secret_configured_refuses_everything() -> None:
    with pytest.raises(SignatureError, match="no webhook secret"):
        verify(b"", VECTOR_BODY, VECTOR_SIG)


@pytest.mark.parametrize(
    ("labels", "prefix"),
    [
        (["self-hosted", "tt", "debian-12", "arm64"], "debian-12:arm64"),
        (["Self-Hosted", "TT", "Debian-13", "X64"], "debian-13:amd64"),
        (["self-hosted", "linux", "tt", "debian-12", "x86_64"], "debian-12:amd64"),
        (["self-hosted", "tt", "debian-12+systemd", "amd64"], "debian-12+systemd:amd64"),
        (["self-hosted", "tt", "debian-14", "riscv64"], "debian-14:riscv64"),
        (["self-hosted", "tt", "s390x", "debian-12"], "debian-12:s390x"),
    ],
)
def test_our_labels_give_an_os_prefix(labels: list[str], prefix: str) -> None:
    m = parse_labels(labels)
    assert m.ours and m.target is not None and not m.reason
    assert m.target.os_prefix == prefix


@pytest.mark.parametrize(
    "labels",
    [["ubuntu-latest"], ["self-hosted", "k8s"], ["tt", "debian-12", "amd64"], ["gpu", "db-app"]],
)
def test_other_peoples_jobs_are_not_ours(labels: list[str]) -> None:
    assert parse_labels(labels) == parse_labels(labels).__class__(ours=False)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (["self-hosted", "tt", "debian-12", "arm64", "gpu"], "gpu are not part"),
        (["self-hosted", "tt", "arm64"], "no OS label"),
        (["self-hosted", "tt", "debian-12", "debian-13", "arm64"], "several OS labels"),
        (["self-hosted", "tt", "debian-12"], "no architecture"),
        (["self-hosted", "tt", "debian-12", "arm64", "amd64"], "several architectures"),
    ],
)
def test_our_marker_with_a_bad_target_is_unservable(labels: list[str], words: str) -> None:
    m = parse_labels(labels)
    assert m.ours and m.target is None
    assert words in m.reason and "runs-on: [self-hosted, tt, debian-12, arm64]" in m.reason


def test_marker_label_is_configurable() -> None:
    assert parse_labels(["self-hosted", "tt", "debian-12", "arm64"], marker="vm").ours is False
    m = parse_labels(["self-hosted", "vm", "debian-12", "arm64"], marker="vm")
    assert m.target is not None and m.target.arch is Arch.ARM64


def test_jit_labels_keep_the_jobs_labels_once() -> None:
    assert jit_labels(["self-hosted", "tt", "TT", "debian-12", "arm64"]) == [
        "self-hosted",
        "tt",
        "debian-12",
        "arm64",
    ]


def test_state_machine_happy_path() -> None:
    s = transition(None, Event.QUEUED)
    for ev, want in [
        (Event.PROVISION, State.PROVISIONING),
        (Event.RUNNER_STARTED, State.STARTED),
        (Event.IN_PROGRESS, State.IN_PROGRESS),
        (Event.COMPLETED, State.COMPLETED),
        (Event.CLEANED, State.DONE),
    ]:
        s = transition(s, ev)
        assert s == want


def test_state_machine_out_of_order_and_repeats() -> None:
    # a second queued, a late in_progress after completion: nothing changes
    assert transition(State.PENDING, Event.QUEUED) is None
    assert transition(State.DONE, Event.IN_PROGRESS) is None
    assert transition(State.COMPLETED, Event.COMPLETED) is None
    # the queued delivery was missed: in_progress/completed still create the record
    assert transition(None, Event.IN_PROGRESS) == State.IN_PROGRESS
    assert transition(None, Event.COMPLETED) == State.DONE
    # cancelled before a VM existed; a VM that failed goes back to pending, never away
    assert transition(State.PENDING, Event.COMPLETED) == State.DONE
    assert transition(State.PROVISIONING, Event.VM_FAILED) == State.PENDING
    assert transition(State.STARTED, Event.RUNNER_EXITED) == State.COMPLETED
    assert transition(State.UNSERVABLE, Event.PROVISION) is None


def test_conclusions_map_to_job_results() -> None:
    assert [result_of(c) for c in ("success", "failure", "cancelled", "timed_out", "weird")] == [
        "success",
        "failed",
        "cancelled",
        "failed",
        "error",
    ]


def test_retry_delay_doubles_and_is_capped() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert retry_delay(30) == 300


def test_runner_env_and_job_match_by_name() -> None:
    assert runner_name(12877621891, 2) == "tt-12877621891-2"
    assert parse_runner_name("tt-12877621891-2") == (12877621891, 2)
    assert parse_runner_name("GitHub Actions 5") is None
    assert parse_runner_name(None) is None
    assert parse_env_name(env_name(5, 1)) == (5, 1)
    assert len(env_name(10**15, 99)) <= 40  # the scheduler's ENV name limit


def test_delivery_ids_and_staleness() -> None:
    assert check_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958") is None
    assert check_delivery_id(None) and check_delivery_id("../../etc")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    job = {"created_at": "2025-12-31T23:59:00Z", "started_at": "2021-01-01T00:00:00Z"}
    assert staleness("queued", job, now, 3600) is None
    assert "more than --max-age" in (staleness("in_progress", job, now, 3600) or "")
    assert "future" in (staleness("queued", {"created_at": "2026-01-02T00:00:00Z"}, now, 60) or "")


def test_parse_event_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        parse_event([1])
    with pytest.raises(ValueError, match="action"):
        parse_event({"workflow_job": {}})
    with pytest.raises(ValueError, match="integer `id`"):
        parse_event({"action": "queued", "workflow_job": {"id": "x", "labels": []}})
    with pytest.raises(ValueError, match="repository"):
        parse_event({"action": "queued", "workflow_job": {"id": 1, "labels": []}})


def _job(
    jid: int, state: State, env: str = "", since: float = 0, live: bool = False
) -> reconcile.OurJob:
    return reconcile.OurJob(jid, state, env, since, live)


def test_reconcile_plan_repairs_each_kind_of_drift() -> None:
    ours = [
        _job(1, State.STARTED, "gh-1-1", since=0),  # GitHub finished it, we missed it
        _job(2, State.STARTED, "gh-2-1", since=0),  # runner never took its job
        _job(3, State.PROVISIONING, "gh-3-1", live=False),  # cut short by a restart
        _job(4, State.PROVISIONING, "gh-4-1", live=True),  # being worked on: leave it
        _job(5, State.COMPLETED, "gh-5-1"),  # VM deletion failed earlier
        _job(6, State.DONE),  # our runner left, GitHub still queues it
        _job(7, State.IN_PROGRESS, "gh-7-1"),  # fine
    ]
    status = {
        1: "completed",
        2: "queued",
        3: "queued",
        4: "queued",
        5: "completed",
        6: "queued",
        7: "in_progress",
    }
    queued = [{"id": 2}, {"id": 3}, {"id": 4}, {"id": 6}, {"id": 99, "labels": []}]
    envs = ["gh-1-1", "gh-2-1", "gh-3-1", "gh-4-1", "gh-5-1", "gh-7-1", "gh-50-1", "other"]
    got = {
        (r.kind, r.job_id, r.env)
        for r in reconcile.plan(
            ours,
            github_status=status,
            github_queued=queued,
            envs=envs,
            now=1000,
            runner_timeout_s=300,
        )
    }
    assert got == {
        ("adopt", 99, ""),
        ("complete", 1, "gh-1-1"),
        ("retry", 2, "gh-2-1"),
        ("retry", 3, "gh-3-1"),
        ("cleanup", 5, "gh-5-1"),
        ("requeue", 6, ""),
        ("delete_env", 0, "gh-50-1"),
    }


def test_reconcile_gives_a_started_runner_time() -> None:
    ours = [_job(2, State.STARTED, "gh-2-1", since=900)]
    assert (
        reconcile.plan(
            ours,
            github_status={2: "queued"},
            github_queued=[{"id": 2}],
            envs=["gh-2-1"],
            now=1000,
            runner_timeout_s=300,
        )
        == []
    )


def test_launch_request_keeps_the_jit_config_off_every_command_line() -> None:
    secret = "eyJydW5uZXIiOiJ0dC0xLTEifQ=="
    for mode in ("env", "argv"):
        req = launch_request("/opt/actions-runner", mode, secret).to_dict()
        assert secret not in " ".join(req["argv"])
        assert base64.b64decode(req["stdin_b64"]).decode() == secret + "\n"
    assert "ACTIONS_RUNNER_INPUT_JITCONFIG" in LAUNCHER and "--jitconfig" in LAUNCHER
    req = launch_request("/opt/actions-runner", "env", secret, b"TARBYTES").to_dict()
    assert base64.b64decode(req["stdin_b64"]) == secret.encode() + b"\nTARBYTES"
    assert req["argv"][-1] == "unpack"
    with pytest.raises(ValueError, match="env or argv"):
        launch_request("/opt/actions-runner", "file", secret)


# -- waiting in TT CI's admission queue (webhooks/core/queueing.py) -----------------------------
def _cands(*spec: tuple[int, str, float]) -> list[queueing.Candidate]:
    return [queueing.Candidate(i, repo, t) for i, repo, t in spec]


def test_free_places_are_shared_out_between_repositories() -> None:
    big = [(i, "o/big", float(i)) for i in range(1, 41)]  # 40 jobs, all older
    small = [(100, "o/small", 50.0), (101, "o/small", 51.0)]
    picks = queueing.pick_to_submit(_cands(*big, *small), {}, 4)
    assert picks == [1, 100, 2, 101]  # round robin, oldest first within a repository
    # the big one already holds 3 places in TT CI's queue: the small one goes first
    assert queueing.pick_to_submit(_cands(*big, *small), {"o/big": 3}, 3) == [100, 101, 1]
    # ties between repositories: the older next job wins
    assert queueing.pick_to_submit(_cands((5, "b", 2.0), (6, "a", 3.0)), {}, 1) == [5]


@pytest.mark.parametrize("slots", [0, -2])
def test_no_free_place_picks_nothing(slots: int) -> None:
    assert queueing.pick_to_submit(_cands((1, "o/r", 1.0)), {}, slots) == []


def test_fewer_jobs_than_places_picks_them_all_in_age_order() -> None:
    cands = _cands((3, "o/a", 3.0), (1, "o/a", 1.0), (2, "o/b", 2.0))
    assert queueing.pick_to_submit(cands, {}, 10) == [1, 2, 3]


def test_the_job_list_says_where_a_job_waits() -> None:
    from ttci.model.resources import Resources
    from ttci.wire.queue import QueueInfo

    info = QueueInfo(3, "no_host", "hosts with the image are down", Resources(1, 1024, 0), 1, 4.0)
    assert queueing.queue_reason(info) == (
        "queued in TT CI at position 3 (no host: hosts with the image are down)"
    )
    assert queueing.queue_reason(QueueInfo(1, "quota", "", Resources(), 1, 0.0)) == (
        "queued in TT CI at position 1 (quota)"
    )
    assert "--max-waiting" in queueing.waiting_reason(8)
    assert "is 0" in queueing.waiting_reason(0)


@pytest.mark.parametrize(
    ("state", "verdict"),
    [
        (State.PROVISIONING, "retry"),  # the scheduler refused or failed it: try again later
        (State.COMPLETED, "cancelled"),  # GitHub's completed took it out of the queue
        (State.DONE, "cancelled"),
        (State.IN_PROGRESS, "cancelled"),  # another runner took the job
        (None, "cancelled"),
    ],
)
def test_an_env_request_ending_without_a_vm(state: State | None, verdict: str) -> None:
    assert queueing.after_stream_end(state) == verdict


def test_which_old_deliveries_are_looked_at_again_and_served() -> None:
    assert queueing.redeliverable(queueing.STALE)
    for outcome in (queueing.STALE_FINAL, "queued", "known", "", None):
        assert not queueing.redeliverable(outcome)
    assert queueing.stale_verdict("queued") == (True, "GitHub still shows the job queued")
    assert queueing.stale_verdict("waiting")[0]  # a deployment gate: not started either
    assert queueing.stale_verdict("completed") == (False, "GitHub shows the job completed")
    assert queueing.stale_verdict("in_progress")[0] is False
    assert queueing.stale_verdict(None) == (False, "GitHub does not know the job")
