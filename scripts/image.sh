#!/usr/bin/env bash
# Build the Mercato image and run each service's container with a gRPC health check,
# with no Docker engine and no image registry: a Debian base root filesystem made by
# mmdebstrap from this machine's Debian mirror, imported with `podman import`, then
# `podman build` of the project's Dockerfile on it, then `podman run` of each service.
#
# What these machines need (docs/operations.md, section 1): runc as the runtime (crun
# fails on their cgroup layout), ulimits lowered to what root may set here, the machine's
# CA bundle inside the base (pip there trusts it), and the CPU torch wheel from this
# machine's disk (pip's find-links) in the build context instead of the CPU wheel index.
#
#   scripts/image.sh            (make image)   writes bench/results/image.json too
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${MERCATO_IMAGE_TAG:-localhost/mercato:dev}
BASE=${MERCATO_IMAGE_BASE:-localhost/mercato-base:bookworm}
SUITE=${MERCATO_IMAGE_SUITE:-bookworm}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/mercato-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Runtime and limits that work as root here: nofile at most the hard limit, nproc <= 32768.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=65536
NPROC=$(ulimit -Hu); { [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; } && NPROC=32768
PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# The Debian mirror this machine's apt uses (deb822 sources or sources.list).
MIRROR=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | awk '{print $2}' | grep -E 'debian/?$' | head -1 || true)
MIRROR=${MERCATO_IMAGE_MIRROR:-${MIRROR:-http://deb.debian.org/debian}}
CA=${MERCATO_IMAGE_CA:-/etc/ssl/certs/ca-certificates.crt}

t0=$(date +%s)
if ! podman image exists "$BASE"; then
  echo "base: mmdebstrap $SUITE from $MIRROR"
  mmdebstrap --variant=apt --quiet \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd,libgomp1 \
    --customize-hook="cp '$CA' \"\$1/usr/local/share/ca-certificates/machine.crt\" && chroot \"\$1\" update-ca-certificates >/dev/null" \
    --customize-hook="printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > \"\$1/etc/pip.conf\"" \
    --customize-hook="rm -rf \"\$1\"/var/lib/apt/lists/*" \
    "$SUITE" "$WORK/base.tar" "$MIRROR"
  podman import --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE" >/dev/null
fi
t1=$(date +%s)

# The CPU torch wheel this machine has (pip's find-links), into the build context.
mkdir -p .image-wheels
TORCH_VERSION=$($PY -c 'import tomllib; d=tomllib.load(open("pyproject.toml","rb")); print(next(x.split("==")[1] for x in d["project"]["dependencies"] if x.startswith("torch==")))')
WHEEL=""
for dir in $($PY -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") /opt/wheels; do
  found=$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then WHEEL=$found; break; fi
done
rm -f .image-wheels/*.whl
if [ -n "$WHEEL" ]; then cp "$WHEEL" .image-wheels/; echo "torch: $WHEEL"; else echo "torch: from the CPU wheel index"; fi

echo "build: $TAG on $BASE"
"${PODMAN[@]}" build --quiet "${ULIMITS[@]}" --build-arg "PYTHON_IMAGE=$BASE" -t "$TAG" . >/dev/null
t2=$(date +%s)
rm -f .image-wheels/*.whl

# Each service's container, as Kubernetes runs it: read-only root, /tmp and
# MERCATO_HOME writable, non-root; host network on a free port; gRPC health from here.
status=0
for svc in profile retrieval ranking gateway; do
  port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  up=$(echo "$svc" | tr a-z A-Z)
  # chown: the tmpfs belongs to the image's user (as an emptyDir with fsGroup is writable).
  cid=$("${PODMAN[@]}" run -d "${ULIMITS[@]}" --network host --read-only --user 10001:10001 \
    --tmpfs /tmp --mount type=tmpfs,destination=/var/lib/mercato,chown=true \
    -e "MERCATO_${up}_HOST=127.0.0.1" -e "MERCATO_${up}_PORT=$port" \
    -e "MERCATO_${up}_METRICS_PORT=0" \
    "$TAG" serve "$svc")
  # retrieval has no model here: its liveness is SERVING, readiness NOT_SERVING (by design)
  check=$([ "$svc" = retrieval ] && echo liveness || echo "mercato.v1.${svc^}Service")
  if $PY -m services.common.healthcheck "127.0.0.1:$port" "$check" --wait 90; then
    echo "run: $svc SERVING ($check)"
  else
    echo "run: $svc FAILED"; "${PODMAN[@]}" logs "$cid" | tail -20; status=1
  fi
  "${PODMAN[@]}" stop -t 15 "$cid" >/dev/null || true
  "${PODMAN[@]}" rm -f "$cid" >/dev/null || true
done
t3=$(date +%s)
size=$(podman image inspect "$TAG" --format '{{.Size}}')
mkdir -p bench/results
printf '{"base_s": %d, "build_s": %d, "run_s": %d, "image_bytes": %s, "torch_wheel": "%s"}\n' \
  $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) "$size" "$(basename "${WHEEL:-index}")" > bench/results/image.json
cat bench/results/image.json
exit $status
