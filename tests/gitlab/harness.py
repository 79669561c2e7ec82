"""A stand-in for gitlab-runner's custom executor, faithful to its published contract.

No gitlab-runner binary is installable here, so this drives a driver exactly as the runner
does (docs/facts/gitlab-custom-executor.md, from GitLab Runner 19.4.0's docs and source):

- `executors/custom/command/command.go` `New`: each call gets `os.Environ()` plus TMPDIR,
  BUILD_FAILURE_EXIT_CODE=1, SYSTEM_FAILURE_EXIT_CODE=2, BUILD_EXIT_CODE_FILE, JOB_RESPONSE_FILE,
  then config's `job_env`, then `CUSTOM_ENV_<KEY>` for every job variable; the working directory
  is the temp dir (`os.MkdirTemp("", "custom-executor")`); the driver is a process-group leader.
- `waitForCommand`: exit 1 is a build failure (the code is read from BUILD_EXIT_CODE_FILE; an
  empty or non-integer file is a system failure), 2 a system failure, anything else unknown.
- `custom.go`: config → prepare → run_exec per stage (`run_args... SCRIPT STAGE`; `step_script`
  renamed `build_script`; scripts in `scriptNNN/script`, mode 0700) → cleanup, always.
- `common/build.go` `retryCreateExecutor`: prepare is tried 3 times for anything but a build
  failure, each attempt with cleanup and a fresh config in a fresh temp dir.
- stage order and which stages a failure skips; a cancel during build_script stops only that
  script, after_script then runs with CI_JOB_STATUS=canceled.
- `helpers/process/killer.go`: on timeout or cancel SIGTERM to the process group, SIGKILL after
  graceful_kill_timeout, abandon after force_kill_timeout.
- the bash the runner generates (`shells/bash.go`): shebang, `trap exit 1 TERM`, a pipefail
  check, errexit, `set +o noclobber`, `: | (eval $'...')`, `exit 0`; variables exported with
  ANSI-C quoting, each command echoed in green before it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUILD_FAILURE, SYSTEM_FAILURE = 1, 2


def ansi_c_quote(s: str) -> str:
    """bash `$'...'` quoting, as the runner's shellEscape writes it (bytes kept as UTF-8)."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def bash_script(lines: Sequence[str], exports: Mapping[str, str], cwd: str | None) -> str:
    """A stage script shaped like the runner's bash writer output."""
    body = []
    for k, v in exports.items():
        body.append(f"export {k}={ansi_c_quote(v)}")
    if cwd:
        body.append(f"cd {ansi_c_quote(cwd)}")
    for line in lines:
        body.append("echo " + ansi_c_quote(f"\x1b[32;1m$ {line}\x1b[0;m"))
        body.append(line)
    return (
        "#!/usr/bin/env bash\n\n"
        "trap exit 1 TERM\n\n"
        "if set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\n"
        "set +o noclobber\n"
        f": | (eval {ansi_c_quote(chr(10).join(body) + chr(10))})\n"
        "exit 0\n"
    )


@dataclass
class Job:
    """What GitLab sends for one job (the parts a driver can see)."""

    job_id: int
    script: list[str]
    variables: dict[str, str] = field(default_factory=dict)
    after_script: list[str] = field(default_factory=list)
    image: str = ""
    cache: bool = False
    artifacts: bool = False
    masked: set[str] = field(default_factory=set)
    project_path: str = "group/project"
    timeout_s: int = 3600
    file_variables: dict[str, str] = field(default_factory=dict)
    steps: dict[str, list[str]] = field(default_factory=dict)  # name -> script, after build
    # GIT_STRATEGY fetch from a real server (repo_url without credentials; the runner puts
    # gitlab-ci-token and the job token into it); "": GIT_STRATEGY none, nothing fetched
    repo_url: str = ""
    sha: str = ""
    ref: str = "main"
    depth: int = 20
    token: str = "glcbt-not-a-real-token"

    def remote_url(self) -> str:
        """The URL get_sources fetches from, with the job token in it (CI_REPOSITORY_URL)."""
        scheme, _, rest = self.repo_url.partition("://")
        return f"{scheme}://gitlab-ci-token:{self.token}@{rest}"

    def predefined(self, builds_dir: str) -> dict[str, str]:
        ns, _, name = self.project_path.rpartition("/")
        return {
            "CI": "true",
            "GITLAB_CI": "true",
            "CI_JOB_ID": str(self.job_id),
            "CI_JOB_NAME": f"job-{self.job_id}",
            "CI_JOB_URL": f"https://gitlab.example.test/{self.project_path}/-/jobs/{self.job_id}",
            "CI_JOB_TIMEOUT": str(self.timeout_s),
            "CI_JOB_IMAGE": self.image,
            "CI_PROJECT_PATH": self.project_path,
            "CI_PROJECT_NAME": name,
            "CI_PROJECT_NAMESPACE": ns,
            "CI_PROJECT_PATH_SLUG": self.project_path.replace("/", "-"),
            "CI_BUILDS_DIR": builds_dir,
            "CI_PROJECT_DIR": f"{builds_dir}/{self.project_path}" if builds_dir else "",
            "CI_CONCURRENT_PROJECT_ID": "0",
            "CI_RUNNER_ID": "9171",
            "CI_RUNNER_DESCRIPTION": "tt-ci test runner",
            "CI_SERVER_URL": "https://gitlab.example.test",
            "CI_JOB_SERVICES": "[]",
            **(
                {
                    "CI_REPOSITORY_URL": self.remote_url(),
                    "CI_COMMIT_SHA": self.sha,
                    "CI_COMMIT_REF_NAME": self.ref,
                }
                if self.repo_url
                else {}
            ),
        }

    def all_variables(self, builds_dir: str) -> dict[str, str]:
        return {**self.predefined(builds_dir), **self.variables}

    def response(self) -> dict[str, object]:
        """A `spec.Job`-shaped JOB_RESPONSE_FILE (the fields drivers read)."""
        variables = [
            {"key": k, "value": v, "public": k not in self.masked, "masked": k in self.masked}
            for k, v in self.all_variables("/builds").items()
        ]
        return {
            "id": self.job_id,
            "token": self.token,
            "allow_git_fetch": True,
            "job_info": {"name": f"job-{self.job_id}", "stage": "test", "project_id": 42},
            "git_info": {"repo_url": "https://gitlab.example.test/group/project.git"},
            "runner_info": {"timeout": self.timeout_s},
            "variables": variables,
            "steps": [
                {"name": "script", "script": self.script, "when": "on_success"},
                {"name": "after_script", "script": self.after_script, "when": "always"},
            ],
            "image": {"name": self.image} if self.image else None,
            "services": [],
        }


@dataclass
class Call:
    """One driver invocation as the runner saw it."""

    argv: list[str]
    rc: int | None  # None: killed and abandoned
    kind: str  # ok, build, system, unknown, killed
    build_exit_code: int | None
    stdout: bytes
    stderr: bytes
    seconds: float
    signals: list[str] = field(default_factory=list)
    what: str = ""  # config, prepare, run, cleanup

    @property
    def stage(self) -> str:
        return self.argv[-1]


@dataclass
class JobResult:
    status: str  # success, failed, system_failure, canceled, timeout
    exit_code: int | None
    calls: list[Call]
    log: bytes  # what the job log shows: prepare's and run's stdout and stderr, in order
    config: dict[str, object]
    prepare_attempts: int

    def stages(self) -> list[str]:
        return [c.stage for c in self.calls if c.what == "run"]

    def of(self, what: str) -> list[Call]:
        return [c for c in self.calls if c.what == what]

    def text(self) -> str:
        return self.log.decode(errors="replace")


@dataclass(frozen=True)
class Faults:
    """What happens to a job from outside: a cancel, or the job's timeout, during a stage."""

    cancel_during: str | None = None  # the user cancels the job during this stage (or prepare)
    cancel_after_s: float = 0
    job_timeout_s: float | None = None
    kill_during: str | None = None  # the job times out during this stage: nothing more runs


@dataclass
class Runner:
    """`[runners.custom]`: one executable with per-stage args, as config.toml wires it."""

    exe: Sequence[str]
    config_args: Sequence[str] = ("config",)
    prepare_args: Sequence[str] = ("prepare",)
    run_args: Sequence[str] = ("run",)
    cleanup_args: Sequence[str] = ("cleanup",)
    env: Mapping[str, str] = field(default_factory=dict)  # the runner process's environment
    graceful_kill_timeout: float = 600
    force_kill_timeout: float = 10
    prepare_retry_delay: float = 3
    exec_timeout: float = 3600  # config_exec_timeout and cleanup_exec_timeout
    prepare_exec_timeout: float = 3600

    def _call(
        self,
        argv: list[str],
        tmp: Path,
        job_env: Mapping[str, str],
        custom: Mapping[str, str],
        *,
        timeout: float | None,
        cancel: threading.Event | None = None,
        log: list[bytes] | None = None,
    ) -> Call:
        env = dict(os.environ)
        env.update(self.env)
        env.update(
            {
                "TMPDIR": str(tmp),
                "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE),
                "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE),
                "BUILD_EXIT_CODE_FILE": str(tmp / "build_exit_code"),
                "JOB_RESPONSE_FILE": str(tmp / "response.json"),
            }
        )
        env.update(job_env)
        env.update({f"CUSTOM_ENV_{k}": v for k, v in custom.items()})
        (tmp / "build_exit_code").unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a process-group leader, as the runner starts it
        )
        out: list[bytes] = []
        err: list[bytes] = []
        lock = threading.Lock()

        def pump(pipe: object, sink: list[bytes]) -> None:
            for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):  # type: ignore[attr-defined]
                with lock:
                    sink.append(chunk)
                    if log is not None:
                        log.append(chunk)

        pumps = [
            threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, err), daemon=True),
        ]
        for t in pumps:
            t.start()
        signals: list[str] = []
        deadline = None if timeout is None else t0 + timeout
        rc: int | None = None
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = proc.wait(timeout=0.05)
                break
            if (deadline is not None and time.monotonic() > deadline) or (
                cancel is not None and cancel.is_set()
            ):
                rc = self._kill(proc, signals)
                break
        for t in pumps:
            t.join(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            pipe.close()
        code_file = tmp / "build_exit_code"
        kind, code = "ok", None
        if rc is None:
            kind = "killed"
        elif rc == BUILD_FAILURE:
            text = code_file.read_text().strip() if code_file.exists() else ""
            try:
                kind, code = "build", int(text)
            except ValueError:
                kind = "system"  # "an empty or non-integer file is a system failure"
        elif rc == SYSTEM_FAILURE:
            kind = "system"
        elif rc != 0:
            kind = "unknown"
        what = "run" if len(argv) >= 2 and argv[-2].endswith("/script") else argv[-1]
        return Call(
            argv, rc, kind, code, b"".join(out), b"".join(err), time.monotonic() - t0, signals, what
        )

    def _kill(self, proc: subprocess.Popen[bytes], signals: list[str]) -> int | None:
        """killer.go: SIGTERM the group, SIGKILL after the graceful timeout, then abandon."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            signals.append("TERM")
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=self.graceful_kill_timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            signals.append("KILL")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.force_kill_timeout)
        return None

    def run_job(
        self,
        job: Job,
        *,
        cancel_during: str | None = None,
        cancel_after_s: float = 0,
        job_timeout_s: float | None = None,
        kill_during: str | None = None,
    ) -> JobResult:
        """Run the whole job the way the runner does; see the module docstring."""
        calls: list[Call] = []
        log: list[bytes] = []
        attempts = 0
        config: dict[str, object] = {}
        while True:
            attempts += 1
            tmp = Path(tempfile.mkdtemp(prefix="custom-executor"))
            try:
                (tmp / "response.json").write_text(json.dumps(job.response()))
                faults = Faults(cancel_during, cancel_after_s, job_timeout_s, kill_during)
                outcome = self._attempt(job, tmp, calls, log, faults)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            config = outcome[2]
            if outcome[0] == "retry" and attempts < 3:
                time.sleep(self.prepare_retry_delay)
                continue
            status = "system_failure" if outcome[0] == "retry" else outcome[0]
            return JobResult(status, outcome[1], calls, b"".join(log), config, attempts)

    # One attempt follows GitLab Runner's stage sequence in one place, as build.go does.
    def _attempt(  # noqa: PLR0912, PLR0915
        self,
        job: Job,
        tmp: Path,
        calls: list[Call],
        log: list[bytes],
        faults: Faults,
    ) -> tuple[str, int | None, dict[str, object]]:
        cancel_during, cancel_after_s = faults.cancel_during, faults.cancel_after_s
        job_timeout_s, kill_during = faults.job_timeout_s, faults.kill_during
        started = time.monotonic()
        custom_cfg = job.all_variables("")  # during config the build dir is not set yet
        c = self._call(
            [*self.exe, *self.config_args], tmp, {}, custom_cfg, timeout=self.exec_timeout
        )
        calls.append(c)
        config: dict[str, object] = {}
        if c.kind != "ok":
            return self._cleanup(tmp, {}, job, calls, ("retry", None, config))
        if c.stdout.strip():
            try:
                config = json.loads(c.stdout)
            except ValueError:
                return self._cleanup(tmp, {}, job, calls, ("retry", None, config))
            if not isinstance(config, dict):
                return self._cleanup(tmp, {}, job, calls, ("retry", None, {}))
        builds_dir = str(config.get("builds_dir") or "/builds")
        job_env = {str(k): str(v) for k, v in dict(config.get("job_env") or {}).items()}  # type: ignore[call-overload]
        custom = job.all_variables(builds_dir)
        cancel = threading.Event()
        timer = threading.Timer(cancel_after_s, cancel.set)
        if cancel_during == "prepare":  # the user cancels the job while prepare runs
            timer.start()
        c = self._call(
            [*self.exe, *self.prepare_args], tmp, job_env, custom,
            timeout=self.prepare_exec_timeout,
            cancel=cancel,
            log=log,
        )  # fmt: skip
        timer.cancel()
        calls.append(c)
        if cancel.is_set():  # a cancelled job is not retried: cleanup, and it ends canceled
            c.signals.insert(0, "cancel")
            return self._cleanup(tmp, job_env, job, calls, ("canceled", None, config))
        if c.kind == "build":
            return self._cleanup(tmp, job_env, job, calls, ("failed", c.build_exit_code, config))
        if c.kind != "ok":
            return self._cleanup(tmp, job_env, job, calls, ("retry", None, config))

        project_dir = custom["CI_PROJECT_DIR"]
        file_dir = f"{project_dir}.tmp"
        exports = dict(custom)
        for k in job.file_variables:
            exports[k] = f"{file_dir}/{k}"
        status: str = "success"
        code: int | None = None
        n = 0

        def stage(name: str, lines: list[str], extra: Mapping[str, str] | None = None) -> Call:
            nonlocal n
            n += 1
            d = tmp / f"script{n:03d}"
            d.mkdir()
            script = d / "script"
            ex = {**exports, **(extra or {})}
            script.write_text(
                bash_script(
                    lines, ex, None if name in ("prepare_script", "get_sources") else project_dir
                )
            )
            script.chmod(0o700)
            cancel = threading.Event()
            timer = None
            if name in (cancel_during, kill_during):
                timer = threading.Timer(cancel_after_s, cancel.set)
                timer.start()
            remaining = None
            if job_timeout_s is not None:
                remaining = max(0.1, job_timeout_s - (time.monotonic() - started))
            call = self._call(
                [*self.exe, *self.run_args, str(script), name],
                tmp,
                job_env,
                custom,
                timeout=remaining,
                cancel=cancel,
                log=log,
            )
            if timer is not None:
                timer.cancel()
            if cancel.is_set():
                call.signals.insert(0, "timeout" if name == kill_during else "cancel")
            calls.append(call)
            return call

        def failed(call: Call) -> bool:
            return call.kind != "ok"

        timed_out = False

        def over(call: Call) -> bool:
            nonlocal timed_out
            if job_timeout_s is not None and time.monotonic() - started >= job_timeout_s:
                timed_out = True
            timed_out = timed_out or "timeout" in call.signals
            return timed_out

        c = stage("prepare_script", ['echo "Running on $(hostname)..."'])
        if failed(c) or over(c):
            return self._cleanup(tmp, job_env, job, calls, self._end(c, timed_out, config))
        file_lines = [
            f"mkdir -p {ansi_c_quote(file_dir)}",
            *[
                f"printf '%s' {ansi_c_quote(v)} > {ansi_c_quote(file_dir + '/' + k)}"
                for k, v in job.file_variables.items()
            ],
        ]
        c = stage("get_sources", [*file_lines, *self._sources_lines(job, project_dir)])
        if over(c):
            return self._cleanup(tmp, job_env, job, calls, self._end(c, timed_out, config))
        user_failed = failed(c)
        canceled = False
        if not user_failed:
            for name, lines in (
                ("restore_cache", self._helper_lines("cache-extractor") if job.cache else []),
                (
                    "download_artifacts",
                    self._helper_lines("artifacts-downloader") if job.artifacts else [],
                ),
            ):
                if not lines:
                    continue
                c = stage(name, lines)
                if over(c):
                    return self._cleanup(tmp, job_env, job, calls, self._end(c, True, config))
                user_failed = user_failed or failed(c)
        if not user_failed:
            c = stage("build_script", job.script)  # step_script is renamed build_script
            if over(c):
                return self._cleanup(tmp, job_env, job, calls, self._end(c, timed_out, config))
            canceled = "cancel" in c.signals
            if failed(c):
                user_failed = True
                code = c.build_exit_code
                if c.kind != "build" and not canceled:
                    status = "system_failure"
            for step, lines in job.steps.items():  # `run:` steps: step_<lower-cased name>
                if user_failed:
                    break
                c = stage(f"step_{step.lower()}", lines)
                if over(c):
                    return self._cleanup(tmp, job_env, job, calls, self._end(c, True, config))
                if failed(c):
                    user_failed, code = True, c.build_exit_code
            if job.after_script:
                st = "canceled" if canceled else ("failed" if user_failed else "success")
                c2 = stage("after_script", job.after_script, {"CI_JOB_STATUS": st})
                if over(c2):
                    return self._cleanup(tmp, job_env, job, calls, self._end(c2, True, config))
        if user_failed:
            if job.cache:
                stage("archive_cache_on_failure", self._helper_lines("cache-archiver"))
            if job.artifacts:
                stage("upload_artifacts_on_failure", self._helper_lines("artifacts-uploader"))
        else:
            if job.cache:
                stage("archive_cache", self._helper_lines("cache-archiver"))
            if job.artifacts:
                stage("upload_artifacts_on_success", self._helper_lines("artifacts-uploader"))
        stage("cleanup_file_variables", [f"rm -rf {ansi_c_quote(file_dir)}"])
        if canceled:
            status = "canceled"
        elif user_failed and status == "success":
            status = "failed"
        return self._cleanup(tmp, job_env, job, calls, (status, code, config))

    @staticmethod
    def _sources_lines(job: Job, project_dir: str) -> list[str]:
        """get_sources as the runner's shell writer makes it: GIT_STRATEGY none, or fetch
        (abstract.go's writeRefspecFetchCmd and writeCheckoutCmd, no submodules, no LFS)."""
        q = ansi_c_quote
        if not job.repo_url:
            return [
                "echo 'Skipping Git repository setup'",
                f"mkdir -p {q(project_dir)}",
                f"cd {q(project_dir)}",
                "git --version",
            ]
        template = f"{project_dir}.tmp/git-template"
        url = job.remote_url()
        return [
            f"echo 'Fetching changes with git depth set to {job.depth}...'",
            f"mkdir -p {q(template)}",
            f"git config -f {q(template + '/config')} init.defaultBranch none",
            f"git config -f {q(template + '/config')} fetch.recurseSubmodules false",
            f"git init {q(project_dir)} --template {q(template)}",
            f"cd {q(project_dir)}",
            f"if git remote add origin {q(url)} >/dev/null 2>/dev/null; then "
            "echo 'Created fresh repository.'; "
            f"else git remote set-url origin {q(url)}; fi",
            "git -c 'http.userAgent=gitlab-runner 19.4.0 linux/amd64' fetch origin --prune "
            f"'+refs/heads/*:refs/remotes/origin/*' '+refs/tags/*:refs/tags/*' --depth {job.depth}",
            f"echo 'Checking out {job.sha[:8]} as detached HEAD (ref is {job.ref})...'",
            f"git checkout -f -q {job.sha}",
            "git clean -ffdx",
            "echo 'Skipping Git submodules setup'",
        ]

    @staticmethod
    def _helper_lines(cmd: str) -> list[str]:
        """What the runner generates for cache/artifact stages: call the helper if present."""
        return [
            "if command -v gitlab-runner >/dev/null 2>/dev/null; then "
            f"gitlab-runner {cmd} --url https://gitlab.example.test/; "
            f"else echo 'Missing gitlab-runner. {cmd} is disabled.'; fi"
        ]

    @staticmethod
    def _end(
        c: Call, timed_out: bool, config: dict[str, object]
    ) -> tuple[str, int | None, dict[str, object]]:
        if timed_out:
            return ("timeout", None, config)
        if "cancel" in c.signals:
            return ("canceled", None, config)
        if c.kind == "build":
            return ("failed", c.build_exit_code, config)
        return ("system_failure", None, config)

    def _cleanup(
        self,
        tmp: Path,
        job_env: Mapping[str, str],
        job: Job,
        calls: list[Call],
        outcome: tuple[str, int | None, dict[str, object]],
    ) -> tuple[str, int | None, dict[str, object]]:
        """cleanup_exec always runs; its failure never changes the job's status."""
        calls.append(
            self._call(
                [*self.exe, *self.cleanup_args],
                tmp,
                job_env,
                job.all_variables(str(outcome[2].get("builds_dir") or "/builds")),
                timeout=self.exec_timeout,
            )
        )
        return outcome
