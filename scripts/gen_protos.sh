#!/usr/bin/env bash
# Regenerates the Python stubs in mercato/v1 from protos/mercato/v1/*.proto.
# Reproducible: same grpcio-tools / mypy-protobuf pins give byte-identical output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
# protoc finds the mypy-protobuf plugins next to the interpreter.
export PATH="$(dirname "$("$PY" -c "import sys; print(sys.executable)")"):$PATH"
rm -f mercato/v1/*_pb2.py mercato/v1/*_pb2_grpc.py mercato/v1/*_pb2.pyi mercato/v1/*_pb2_grpc.pyi
"$PY" -m grpc_tools.protoc \
  -I protos \
  --python_out=. \
  --grpc_python_out=. \
  --mypy_out=quiet:. \
  --mypy_grpc_out=quiet:. \
  protos/mercato/v1/*.proto
echo "generated: $(ls mercato/v1/*_pb2*.py | wc -l) modules in mercato/v1"
