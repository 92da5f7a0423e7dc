#!/usr/bin/env bash
# Create the virtualenv (default .venv) with Python 3.11 or newer: tools/make_venv.sh [DIR]
# $PYTHON picks the interpreter; otherwise python3.11, then python3 (installed with apt-get
# when there is none). Debian ships venv's pip bootstrap as a package of its own: added if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [ -z "$python" ]; then
    tools/apt_ensure.sh python3:python3 python3-venv
    python=$(command -v python3)
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "make_venv: Python 3.11 or newer is needed; $python is $("$python" --version 2>&1)." >&2
    echo "make_venv: install python3.11 or run with PYTHON=/path/to/python3.11" >&2
    exit 1
fi

echo "make_venv: creating $venv with $python ($("$python" --version 2>&1))"
if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    tools/apt_ensure.sh "$(basename "$python")-venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
