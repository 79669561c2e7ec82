"""How the runner is started inside the VM: the launcher script and its agent request."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from ttci.wire.commands import ExecRequest

__all__ = ["LAUNCHER", "STARTED_MARK", "launch_request", "tar_dir"]

# Started in the VM through the agent. The JIT config comes on stdin, never on a command line:
# in `env` mode it reaches the runner as ACTIONS_RUNNER_INPUT_JITCONFIG (actions/runner reads
# ACTIONS_RUNNER_INPUT_<ARG> as its --<arg> option, as actions-runner-controller passes it), so
# no process list ever shows it; `argv` mode passes `run.sh --jitconfig` for runners that need it
# (then it is in run.sh's and the listener's argv for the job's lifetime: visible to `ps`).
LAUNCHER = r"""set -eu
IFS= read -r ACTIONS_RUNNER_INPUT_JITCONFIG
if [ "$3" = unpack ]; then mkdir -p "$1" && tar -x -C "$1" -f -; fi
cd "$1"
export RUNNER_ALLOW_RUNASROOT=1
echo "ttci: starting $1/run.sh" >&2
if [ "$2" = argv ]; then
  jit=$ACTIONS_RUNNER_INPUT_JITCONFIG; unset ACTIONS_RUNNER_INPUT_JITCONFIG
  exec ./run.sh --jitconfig "$jit"
fi
export ACTIONS_RUNNER_INPUT_JITCONFIG
exec ./run.sh
"""
STARTED_MARK = "ttci: starting "


def launch_request(
    runner_dir: str, jit_via: str, encoded_jit_config: str, bundle: bytes | None = None
) -> ExecRequest:
    """The agent request that starts run.sh; the JIT config travels on stdin only.

    bundle: a tar of the runner directory, unpacked into runner_dir first (--push-runner);
    it follows the JIT config line on stdin, so push and start are one round trip."""
    if jit_via not in ("env", "argv"):
        raise ValueError(f"jit_via {jit_via!r} is not env or argv")
    stdin = encoded_jit_config.encode() + b"\n" + (bundle or b"")
    return ExecRequest(
        ("/bin/sh", "-c", LAUNCHER, "tt-runner", runner_dir, jit_via, "unpack" if bundle else "-"),
        stdin=stdin,
    )


def tar_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(path.iterdir()):
            tar.add(p, arcname=p.name)
    return buf.getvalue()
