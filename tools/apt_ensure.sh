#!/usr/bin/env bash
# Install Debian packages that are missing: tools/apt_ensure.sh [--optional] PACKAGE[:COMMAND]...
#
# PACKAGE:COMMAND counts as present when COMMAND is on the PATH (chromium, qemu-utils:qemu-img);
# a bare PACKAGE when dpkg says it is installed (python3-venv). Missing ones are installed with
# apt-get when we are root. Without root or apt-get: an error, or with --optional a warning
# (the tests that need the package then say so themselves).
set -euo pipefail

optional=false
if [ "${1:-}" = "--optional" ]; then optional=true; shift; fi

missing=()
for spec in "$@"; do
    package=${spec%%:*}
    command=${spec#*:}
    if [ "$command" != "$spec" ]; then
        command -v "$command" >/dev/null 2>&1 && continue
    else
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" && continue
    fi
    missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    message="missing: ${missing[*]} (install with: sudo apt-get install ${missing[*]})"
    if $optional; then echo "apt_ensure: warning: $message" >&2; exit 0; fi
    echo "apt_ensure: $message" >&2
    exit 1
fi

echo "apt_ensure: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine or container often has no package lists yet: refresh them only when needed.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
