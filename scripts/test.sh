#!/usr/bin/env bash
# The test command: install (idempotent), lint, type-check, then the whole test suite.
#
#   scripts/test.sh                    # everything
#   scripts/test.sh -k cache -x        # extra arguments go to pytest
#
# The tests mount real FUSE filesystems (needs /dev/fuse and fusermount3) on a real S3 server
# (SeaweedFS, installed into the venv); nothing is skipped for lack of them, they fail instead.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${S3CACHEFS_VENV:-$REPO/.venv}
cd "$REPO"

step() { printf '\n== %s\n' "$*"; }

step "install"
bash "$REPO/scripts/install.sh"

# System tools only the tests use (the durability test traces the daemon's fsyncs with strace).
missing=()
for tool in strace; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]} (for the tests)"
    sudo_=()
    [ "$(id -u)" -eq 0 ] || sudo_=(sudo -n)
    "${sudo_[@]}" apt-get update -qq
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "ruff check s3cachefs tests bench"
"$VENV/bin/python" -m ruff check s3cachefs tests bench

step "mypy s3cachefs tests bench"
"$VENV/bin/python" -m mypy s3cachefs tests bench

step "pytest $*"
rc=0
"$VENV/bin/python" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit code 5); that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
