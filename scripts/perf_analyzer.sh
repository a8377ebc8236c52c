#!/usr/bin/env bash
# Install Triton's perf_analyzer in .tools/perf_analyzer/ (README, "Using Triton's and TF
# Serving's tools"); the tests use it from there (tests/conftest.py, perf_analyzer()).
#   scripts/perf_analyzer.sh     -> .tools/perf_analyzer/perf_analyzer (a wrapper that finds its
#                                   CUDA runtime library); re-running is a no-op
# The wheels and their hashes are pinned in scripts/requirements-perf-analyzer.txt; the binary
# also needs libb64 (apt-get install libb64-0d). Linux x86_64 only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DIR=.tools/perf_analyzer
if [ -x "$DIR/perf_analyzer" ] && cmp -s scripts/requirements-perf-analyzer.txt "$DIR/requirements.txt"; then
    echo "$DIR/perf_analyzer"
    exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR/wheels" "$DIR/bin" "$DIR/lib"
# --platform: the wheels are for Linux x86_64 whatever this Python is; --no-deps: only the
# binary and one library are wanted, not tritonclient's Python dependencies
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --require-hashes -r scripts/requirements-perf-analyzer.txt \
    -d "$DIR/wheels"
"$PYTHON" - "$DIR" <<'PY'
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1])
wanted = {"/bin/perf_analyzer": out / "bin", "/lib/libcudart.so.12": out / "lib"}
found = set()
for wheel in sorted((out / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for tail, target in wanted.items():
                if name.endswith(tail):
                    path = target / Path(name).name
                    path.write_bytes(z.read(name))
                    path.chmod(0o755)
                    found.add(tail)
missing = set(wanted) - found
if missing:
    sys.exit(f"not in the wheels: {', '.join(sorted(missing))}")
PY
rm -rf "$DIR/wheels"
cat >"$DIR/perf_analyzer" <<'SH'
#!/bin/sh
# perf_analyzer with the CUDA runtime library it links (scripts/perf_analyzer.sh)
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
SH
chmod +x "$DIR/perf_analyzer"
cp scripts/requirements-perf-analyzer.txt "$DIR/requirements.txt"
echo "$DIR/perf_analyzer"
