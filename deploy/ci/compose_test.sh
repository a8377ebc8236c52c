#!/usr/bin/env bash
# Build the image and run the compose stack for real, then check it from outside:
# predictions through the SDK on real digits, the container's health check, Prometheus having
# scraped the server, and the README's training command run by a user who is not root. Starts
# its own Docker engine (Debian's docker.io), builds the base image with debootstrap (no
# registry is reachable here) and stand-ins for the python and prometheus images. Grafana has
# no Debian package and is not started; its dashboard is tested against a real Prometheus in
# tests/test_deploy.py. Bounded: about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ts() { echo "[$(date +%T)] compose test: $*"; }

export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    ts "installing docker.io, docker-compose, debootstrap"
    apt-get install -y -q --no-install-recommends docker.io containerd runc tini docker-compose \
        iptables debootstrap >/tmp/mnist-apt-docker.log
fi

D=/var/tmp/mnist-docker
mkdir -p $D
export DOCKER_HOST=unix://$D/docker.sock DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
dockerd --data-root $D/data --exec-root $D/exec --pidfile $D/dockerd.pid -H $DOCKER_HOST \
    --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    >$D/dockerd.log 2>&1 &
DOCKERD=$!
C=(-p mnistci -f $D/compose.yml)
cleanup() {
    docker-compose "${C[@]}" logs --no-color >$D/compose-logs.txt 2>&1 || true
    docker-compose "${C[@]}" down -v -t 10 >/dev/null 2>&1 || true
    kill -TERM $DOCKERD 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 $DOCKERD 2>/dev/null || break; sleep 0.5; done
    umount $D/exec/netns/default 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
docker version --format 'engine {{.Server.Version}}'

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    ts "debootstrap base image"
    R=/var/tmp/mnist-rootfs
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    rm -rf $R
    debootstrap --variant=minbase --include=ca-certificates bookworm $R "${MIRROR:-http://deb.debian.org/debian}" >$D/debootstrap.log 2>&1
    rm -f $R/etc/apt/sources.list
    cp /etc/apt/sources.list.d/debian.sources $R/etc/apt/sources.list.d/ 2>/dev/null || true
    # the package registries' TLS is re-signed by a local CA here: the image must trust it too
    cp /usr/local/share/ca-certificates/*.crt $R/usr/local/share/ca-certificates/ 2>/dev/null || true
    chroot $R update-ca-certificates >/dev/null 2>&1
    # as Debian's own slim images: no package cache, lists, docs, manuals or translations
    rm -rf $R/var/lib/apt/lists/* $R/var/cache/apt/*.bin $R/var/cache/apt/archives/*.deb \
        $R/usr/share/doc/* $R/usr/share/man/* $R/usr/share/info/* $R/usr/share/locale/*
    tar -C $R -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf $R
fi
for d in deploy/ci/standins/*/; do
    tag=$(head -1 "$d/image")
    docker image inspect "$tag" >/dev/null 2>&1 || { ts "stand-in $tag"; docker build -q --network=host -t "$tag" "$d" >/dev/null; }
done

ts "compose config"
export MNIST_DATA="${MNIST_DATA_DIR:-$ROOT/../shared/data/mnist}"
docker-compose -f docker-compose.yml config >$D/merged.yml
python3 deploy/ci/hostnet.py <$D/merged.yml >$D/compose.yml

ts "build images (serve, train)"
docker-compose "${C[@]}" build server trainer >$D/build.log 2>&1 || { tail -40 $D/build.log; exit 1; }
for image in mnist-serving:latest mnist-serving-train:latest; do
    docker image ls $image --format 'image {{.Repository}}:{{.Tag}} {{.Size}}'
    if docker run --rm --entrypoint sh $image -c 'command -v gcc cc' ; then
        echo "FAIL: build tools in $image"; exit 1
    fi
    [ "$(docker run --rm --entrypoint id $image -u)" != 0 ] || { echo "FAIL: $image runs as root"; exit 1; }
done
serve_mb=$(( $(docker image inspect mnist-serving:latest --format '{{.Size}}') / 1000000 ))
echo "serving image: ${serve_mb} MB"
[ "$serve_mb" -le 300 ] || { echo "FAIL: the serving image is over 300 MB"; exit 1; }
if docker run --rm --entrypoint python mnist-serving:latest -c 'import tensorflow' 2>/dev/null; then
    echo "FAIL: TensorFlow in the serving image"; exit 1
fi

ts "each image holds exactly the packages and versions uv.lock gives its install"
# what the lock installs on this platform (markers evaluated) against what the image has
for image_extra in "mnist-serving:latest " "mnist-serving-train:latest --extra=train"; do
    image=${image_extra%% *} extra=${image_extra#* }
    .tools/uv/bin/uv export --quiet --frozen --no-dev --no-emit-workspace --no-hashes --no-header \
        --no-annotate $extra | .venv/bin/python -c '
import sys
from packaging.requirements import Requirement
for line in filter(None, map(str.strip, sys.stdin)):
    r = Requirement(line)
    if not r.marker or r.marker.evaluate():
        print(f"{r.name.lower()}=={str(r.specifier)[2:]}")' | sort >$D/lock-versions.txt
    docker run --rm -i --entrypoint python "$image" - <<'PY' | sort >$D/image-versions.txt
import re
from importlib.metadata import distributions
for d in distributions():
    name = re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
    if not name.startswith("mnist-"):
        print(f"{name}=={d.version}")
PY
    diff $D/lock-versions.txt $D/image-versions.txt \
        || { echo "FAIL: $image differs from uv.lock (< lock, > image)"; exit 1; }
    echo "$image: $(wc -l <$D/image-versions.txt) packages as locked:" \
        "$(grep -E '^(grpcio|protobuf|numpy|ai-edge-litert|tensorflow-cpu|keras)==' $D/image-versions.txt | tr '\n' ' ')"
done

ts "the README's training command, as written, by a user who is not root (folder of theirs)"
# a host user with a home of their own; the engine's socket is this test's private one
U=10002 H=$D/user-home
rm -rf "$H" && install -d -o $U -g $U "$H"
chmod 666 "${DOCKER_HOST#unix://}"
cmd=$(sed -n '/^mkdir -p models/,/--model-dir \/models$/p' README.md)
[ -n "$cmd" ] || { echo "FAIL: the README's training command not found"; exit 1; }
cmd=${cmd//\/path\/to\/mnist/$MNIST_DATA}
cmd=${cmd/--arch cnn/--arch mlp --limit 2000 --epochs 1 --quiet}  # a quick model, same path
(cd "$H" && setpriv --reuid $U --regid $U --clear-groups env -i PATH="$PATH" HOME="$H" \
    DOCKER_HOST="$DOCKER_HOST" bash -euc "$cmd") >$D/train-as-user.log 2>&1 \
    || { tail -20 $D/train-as-user.log; echo "FAIL: the README's training command"; exit 1; }
owner=$(stat -c %u "$H/models/1/model.tflite")
[ "$owner" = $U ] || { echo "FAIL: version written as uid $owner, not the user's $U"; exit 1; }
echo "trained as uid $U into a folder of theirs: $(ls "$H/models/1" | tr '\n' ' ')"

ts "compose up (trainer, server, prometheus)"
docker-compose "${C[@]}" up -d trainer server prometheus >$D/up.log 2>&1 || { cat $D/up.log; exit 1; }

ts "waiting for the server container to be healthy"
server=$(docker-compose "${C[@]}" ps -q server)
for _ in $(seq 1 120); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$server" 2>/dev/null || echo none)
    [ "$status" = healthy ] && break
    sleep 2
done
echo "server health: $status"
[ "$status" = healthy ] || { docker-compose "${C[@]}" logs --no-color | tail -60; exit 1; }

ts "calling the server in the container through the SDK"
.venv/bin/python - "$MNIST_DATA" <<'PY'
import sys
from pathlib import Path
from mnist_client import DigitClient
from training.data import load_idx_dir
data = load_idx_dir(Path(sys.argv[1]))
with DigitClient("127.0.0.1:8500") as client:
    info = client.model_info()
    batch = client.batch_predict(data.x_test[:1000])
    single = client.predict(data.x_test[0])
accuracy = float((batch.digits == data.y_test[:1000]).mean())
print(f"model v{info.model_version} {info.architecture} on {info.device} ({info.runtime}): "
      f"accuracy on 1000 test digits {accuracy:.3f}, first digit {single.digit}")
assert accuracy > 0.9 and single.digit == int(data.y_test[0])
PY

ts "checking that Prometheus scraped the server"
ok=
for i in $(seq 1 60); do
    r=$(curl -fsS -G http://127.0.0.1:9090/api/v1/query \
        --data-urlencode 'query=sum(mnist_requests_total{code="OK"}) and on() up{job="mnist-server"} == 1' 2>/dev/null || true)
    case "$r" in *'"value"'*) ok=1; echo "prometheus sees the server's requests after ${i}s: $r"; break;; esac
    sleep 1
done
[ -n "$ok" ] || { echo "FAIL: Prometheus has no mnist_requests_total"; exit 1; }
echo "compose stack: 5 passed, 0 failed"
