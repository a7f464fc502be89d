"""`python -m services.common.health_probe HOST:PORT [--wait SECONDS]`: exit 0 once SERVING.

Used by the local stack scripts to wait for services, and on k8s as the exec probe of prod, where
TLS is on (kubelet's native gRPC probes cannot present a client certificate; dev uses them).
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls


def serving(target: str, service: str = "", timeout: float = 1.0) -> bool:
    try:
        with tls.insecure_or_secure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--service", default="")
    p.add_argument("--wait", type=float, default=0.0)
    args = p.parse_args()
    deadline = time.monotonic() + args.wait
    while True:
        if serving(args.target, args.service):
            return 0
        if time.monotonic() >= deadline:
            print(f"{args.target}: not serving", file=sys.stderr)
            return 1
        time.sleep(0.3)


if __name__ == "__main__":
    raise SystemExit(main())
