#!/usr/bin/env bash
# Regenerates the stubs into a scratch copy and fails if they differ from mercato/v1.
set -euo pipefail
cd "$(dirname "$0")/.."
# Absolute interpreter path: the generation runs in a scratch folder.
PYTHON="$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')"
export PYTHON
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r protos scripts "$tmp"/
mkdir -p "$tmp/mercato/v1"
(cd "$tmp" && ./scripts/gen_protos.sh >/dev/null)
status=0
for f in "$tmp"/mercato/v1/*_pb2*; do
  name="$(basename "$f")"
  if ! cmp -s "$f" "mercato/v1/$name"; then
    echo "stale generated stub: mercato/v1/$name (run 'make protos')" >&2
    status=1
  fi
done
for f in mercato/v1/*_pb2*; do
  [ -e "$tmp/mercato/v1/$(basename "$f")" ] || { echo "orphan stub: $f" >&2; status=1; }
done
[ "$status" -eq 0 ] && echo "generated stubs are fresh"
exit "$status"
