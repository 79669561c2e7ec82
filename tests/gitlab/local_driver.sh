#!/bin/bash
# A minimal custom-executor driver in the spirit of GitLab's executors/custom/testdata/
# test_executor: runs every stage on the host. Used to show the harness is not fitted to ours.
set -u
case "$1" in
config) printf '{"builds_dir":"%s/builds","cache_dir":"%s/cache","driver":{"name":"local-sh","version":"1"}}\n' "$TMPDIR" "$TMPDIR" ;;
prepare) echo "local-sh: preparing job $CUSTOM_ENV_CI_JOB_ID" ;;
run)
    bash "$2"
    rc=$?
    if [ "$rc" -ne 0 ]; then echo "$rc" > "$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"; fi
    ;;
cleanup) echo "local-sh: cleanup" ;;
*) exit "$SYSTEM_FAILURE_EXIT_CODE" ;;
esac
