#!/usr/bin/env bash
# Renew uv.lock, the one lock file for every install path (README, "Installing").
#   scripts/lock.sh                 re-lock after editing a pyproject.toml (keeps the other pins)
#   scripts/lock.sh --upgrade       every package to the newest version the ranges allow
#   scripts/lock.sh --upgrade-package grpcio    one package (and what it needs)
#   scripts/lock.sh --uv 0.14.0     move the pinned uv itself (scripts/requirements-uv.txt)
# then ./test.sh, and commit uv.lock with the pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh uv
UV=.tools/uv/bin/uv
if [ "${1:-}" = "--uv" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 --uv VERSION" >&2; exit 2; }
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    echo "uv==$2" >"$tmp/in.txt"
    "$UV" pip compile --quiet --universal --generate-hashes --no-header --no-annotate \
        "$tmp/in.txt" -o "$tmp/out.txt"
    { sed -n '1,/^# its release/p' scripts/requirements-uv.txt; cat "$tmp/out.txt"; } >"$tmp/new.txt"
    mv "$tmp/new.txt" scripts/requirements-uv.txt
    exit
fi
exec "$UV" lock "$@"
