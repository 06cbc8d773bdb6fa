"""`python -m service.health_probe [--service NAME] [HOST:PORT]`: one grpc.health.v1 Check,
exit 0 when SERVING, 1 otherwise (NOT_SERVING, an unknown service name, no answer within
the timeout). For container health checks where no grpc_health_probe binary is at hand
(deploy/Dockerfile's HEALTHCHECK).

The address defaults to AUTH_LISTEN's (127.0.0.1:50051 when unset), with a wildcard host
replaced by the loopback address of its family (0.0.0.0 by 127.0.0.1, [::] by [::1]): a
replica listening on every address answers there, one listening on a specific address
(127.0.0.2, a pod's IP, [::1]) only there. The call is plaintext (TLS listeners are probed
by the orchestrator, or with grpcurl).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from authsvc_client.addresses import HostPort
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SERVICE = "auth.v1.AuthService"


class BadListenSetting(ValueError):
    """AUTH_LISTEN is no address the probe can call."""


def default_address(environ: dict[str, str] | os._Environ[str]) -> str:
    """AUTH_LISTEN's address, a wildcard host replaced by its family's loopback address
    (the wildcard is no address to call); BadListenSetting naming AUTH_LISTEN otherwise."""
    try:
        listen = HostPort.parse(environ.get("AUTH_LISTEN") or DEFAULT_LISTEN)
    except ValueError as error:
        raise BadListenSetting(f"AUTH_LISTEN: {error}") from None
    if listen.port == 0:
        raise BadListenSetting("AUTH_LISTEN: port 0 (any free port) is no port to probe")
    host = listen.ip  # None for a name: it resolves to the address the server bound
    if host is not None and host.is_unspecified:
        loopback = "127.0.0.1" if host.version == 4 else "::1"
        return str(HostPort(loopback, listen.port))
    return str(listen)


def probe(address: str, service: str, timeout: float) -> bool:
    """Whether `service` at `address` answers SERVING within `timeout` seconds."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{address} {service or '(server)'}: {error.code().name}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} {service or '(server)'}: {status}")
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.health_probe",
        description="grpc.health.v1 Check: exit 0 when SERVING, 1 otherwise",
    )
    parser.add_argument(
        "address", nargs="?", help="HOST:PORT (default: AUTH_LISTEN, a wildcard host as loopback)"
    )
    parser.add_argument("--service", default=DEFAULT_SERVICE, help=f"default {DEFAULT_SERVICE}")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    if args.address:
        try:
            given = HostPort.parse(args.address)
        except ValueError as error:
            parser.error(f"address: {error}")
        if given.port == 0:
            parser.error("address: port 0 is no address to call")
        address = str(given)
    else:
        try:
            address = default_address(os.environ)
        except BadListenSetting as error:
            parser.error(str(error))
    if not 0 < args.timeout <= 60:
        parser.error("--timeout: more than 0, at most 60 seconds")
    return 0 if probe(address, args.service, args.timeout) else 1


if __name__ == "__main__":
    raise SystemExit(main())
