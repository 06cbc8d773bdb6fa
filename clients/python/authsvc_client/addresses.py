"""HOST:PORT, the form of every address authsvc listens on (`AUTH_LISTEN`,
`AUTH_METRICS_LISTEN`): parsed, checked and written back in one place.

An IPv6 host is written in brackets (`[::1]:50051`); `host` holds it without them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ALLOWED = "HOST:PORT, for example 127.0.0.1:50051"
"""What an address may be: the whole of the error message, so it never echoes the text."""

_MAX_ADDRESS_CHARS = 300
_MAX_HOST_CHARS = 255
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (name, IPv4 or IPv6 address, without brackets) and a port (0: any free one)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """`text` as HOST:PORT (an IPv6 host in brackets or not), port 0 to 65535;
        ValueError(ALLOWED) otherwise."""
        if not isinstance(text, str) or len(text) > _MAX_ADDRESS_CHARS or not text.isprintable():
            raise ValueError(ALLOWED)
        host, separator, port = text.rpartition(":")
        if not separator or not _is_port(port) or not _is_host(host):
            raise ValueError(ALLOWED)
        return cls(_unbracketed(host), int(port))

    def __str__(self) -> str:
        """HOST:PORT again, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def with_port(self, port: int) -> HostPort:
        """The same host on `port` (the one bound when 0 was asked for)."""
        return HostPort(self.host, port)

    @property
    def is_loopback(self) -> bool:
        """Whether it binds only the loopback interface."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _unbracketed(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_host(text: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 address (in brackets or not)."""
    if len(text) > _MAX_HOST_CHARS:
        return False
    try:
        ipaddress.ip_address(_unbracketed(text))
    except ValueError:
        return _HOSTNAME.fullmatch(text) is not None
    return True


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535
