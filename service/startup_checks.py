"""Start-up checks that turn a bad file or address into one line for the operator
(`ConfigurationError`, exit code 2: docs/operations.md, "The `authsvc` command") before gRPC or the
metrics endpoint log errors of their own: the listen addresses, the TLS files, the
file of known calling services.
"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
from authsvc_client.addresses import HostPort
from prometheus_client import CollectorRegistry

from service.api.callers import ServiceDirectory
from service.failures import ConfigurationError
from service.metrics import MetricsEndpoint
from service.settings import Settings


def start_metrics_endpoint(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """The /metrics endpoint on `listen`, or one line saying it cannot listen there."""
    try:
        return MetricsEndpoint.start(listen, registry)
    except OSError as exc:
        raise ConfigurationError(
            f"AUTH_METRICS_LISTEN: cannot listen on {listen} ({exc.strerror or exc})"
        ) from None


def check_can_listen(address: str) -> None:
    """Refuse an address we cannot bind (in use, not ours) with one line, before gRPC logs
    its own error lines and before any database work. SO_REUSEADDR as gRPC sets it, so a
    port left in TIME_WAIT by a server just stopped is not refused."""
    parsed = HostPort.parse(address)
    if parsed.port == 0:
        return
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            parsed.host or None,
            parsed.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        raise ConfigurationError(
            f"AUTH_LISTEN: cannot listen on {address} ({exc.strerror or exc})"
        ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from AUTH_TLS_CERT/KEY, requiring client certificates if AUTH_TLS_CLIENT_CA is set;
    None for plaintext."""
    settings.check_transport()
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read_file("AUTH_TLS_CLIENT_CA", settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [
            (
                _read_file("AUTH_TLS_KEY", settings.tls_key),
                _read_file("AUTH_TLS_CERT", settings.tls_cert),
            )
        ],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read_file(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot read {path} ({exc.strerror})") from None


def service_directory(settings: Settings) -> ServiceDirectory:
    """The known calling services (none without AUTH_SERVICE_TOKENS_FILE)."""
    if settings.service_tokens_file is None:
        return ServiceDirectory([])
    return ServiceDirectory.from_file(settings.service_tokens_file)
