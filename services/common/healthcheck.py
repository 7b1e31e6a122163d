"""gRPC health check from the command line (image smoke tests, scripts):

    python -m services.common.healthcheck HOST:PORT [SERVICE] [--wait SECONDS]

Exits 0 when the service reports SERVING (within ``--wait``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name, or UNREACHABLE (code)."""
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    except grpc.RpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--wait", type=float, default=0.0, help="retry this long")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args.target, args.service)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
