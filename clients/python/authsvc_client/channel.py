"""How a client reaches authsvc: the retry policy for UNAVAILABLE, the gRPC service config
that spreads calls over every replica (round_robin with client-side health checking), and
one target naming several replicas. Used by `authsvc_client.client.AuthClient`; the service
config is also what clients in other languages load (deploy/grpc-service-config.json).
Why: docs/clients.md and docs/scaling.md.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from authsvc_client.addresses import HostPort
from authsvc_client.gen.auth.v1 import auth_pb2

__all__ = ["HEALTH_SERVICE", "NO_RETRY", "RetryPolicy", "addresses_target", "service_config"]


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: attempt n (from 1) sleeps a uniformly random time in
    [0, min(max_backoff, initial_backoff * multiplier**(n-1))] before attempt n+1."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The sleep after failed attempt `attempt` (1-based): full jitter."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return rng.uniform(0.0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)

# NOT_SERVING while a replica drains (SIGTERM) or its clock is too far off: the name a
# client-side health check should watch.
HEALTH_SERVICE = "auth.v1.AuthService"
_AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# Issue is never retried (see the module docstring); every other method may be.
_RETRIED_METHODS = ("Validate", "Refresh", "Revoke", "GetJwks")


def service_config(
    *, health_service: str | None = HEALTH_SERVICE, retry: RetryPolicy | None = None
) -> dict[str, Any]:
    """The gRPC service config that spreads calls over every address a target resolves
    to: `round_robin`, with client-side health checking on `health_service` (None: off).
    With `retry`, gRPC's own retryPolicy on UNAVAILABLE for every method but Issue: for
    clients that do not retry themselves (AuthClient does, so it passes none)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    if retry is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": _AUTH_SERVICE, "method": m} for m in _RETRIED_METHODS],
                "retryPolicy": {
                    # gRPC caps maxAttempts at 5 whatever is asked (and needs at least 2).
                    "maxAttempts": min(max(retry.max_attempts, 2), 5),
                    "initialBackoff": f"{retry.initial_backoff:g}s",
                    "maxBackoff": f"{retry.max_backoff:g}s",
                    "backoffMultiplier": retry.multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def addresses_target(addresses: Sequence[str]) -> str:
    """One gRPC target naming several replicas: "ipv4:10.0.0.5:50051,10.0.0.6:50051" (or
    "ipv6:..."). Each address is IP:PORT (an IPv6 address in brackets: `[fd00::5]:50051`),
    all of one family; for host names use one DNS name with a record per replica
    ("dns:///name:port") instead."""
    if isinstance(addresses, str) or not addresses:
        raise ValueError("addresses: a non-empty list of IP:PORT")
    families = set()
    written = []
    for text in addresses:
        try:
            address = HostPort.parse(text)
        except ValueError:
            raise ValueError("addresses: each one IP:PORT") from None
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            raise ValueError(
                "addresses: IP:PORT only; for host names use one DNS name with a record per "
                'replica (target="dns:///NAME:PORT", balance=True)'
            ) from None
        if address.port == 0:
            raise ValueError("addresses: port 0 is not an address to call")
        families.add(ip.version)
        written.append(str(address))
    if len(families) != 1:
        raise ValueError("addresses: all IPv4 or all IPv6, not both")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(written)
