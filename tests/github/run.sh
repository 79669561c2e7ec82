#!/bin/sh
# Stand-in for actions/runner's run.sh (the real one is in no package registry here).
# It records what it was started with, as the real runner would read it (`--jitconfig X`, or
# ACTIONS_RUNNER_INPUT_JITCONFIG, which actions/runner reads as its --jitconfig option), drops
# the variable as the real runner does, then waits like a runner on its one job: it exits when
# /tmp/tt-runner-exit appears (the job ended, or the runner died on its own).
{
  printf 'argv=%s\n' "$*"
  printf 'env_jit=%s\n' "${ACTIONS_RUNNER_INPUT_JITCONFIG:-}"
  if [ "${1:-}" = --jitconfig ]; then printf 'arg_jit=%s\n' "$2"; fi
  printf 'pwd=%s\n' "$(pwd)"
  printf 'allow_root=%s\n' "${RUNNER_ALLOW_RUNASROOT:-}"
} > /tmp/tt-runner-record
unset ACTIONS_RUNNER_INPUT_JITCONFIG
echo "stand-in runner: listening for jobs"
while [ ! -e /tmp/tt-runner-exit ]; do sleep 0.2; done
echo "stand-in runner: exiting"
exit "$(cat /tmp/tt-runner-exit 2>/dev/null || echo 0)"
