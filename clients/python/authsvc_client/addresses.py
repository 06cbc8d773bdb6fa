"""HOST:PORT, the form of every address authsvc listens on (`AUTH_LISTEN`,
`AUTH_METRICS_LISTEN`): parsed, checked and written back in one place.

One spelling per address, the one gRPC targets and URLs use: an IPv6 host in brackets
(`[::1]:50051`; `::1:0` could be host ::1 port 0 or host ::1:0 with no port), brackets for
nothing else; a port in digits without leading zeros (`0080` is refused); a host of
numbers only as a dotted quad (`127.1`, `0x7f.0.0.1` or `2130706433` are IPv4 addresses to
getaddrinfo, but not to the loopback test or a reader). `host` holds an IPv6 address
without its brackets; a zone id (`[fe80::1%eth0]:80`) only of RFC 6874's characters
(letters, digits, `-._~`). The service parses its address settings with this module, so the
two agree.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ALLOWED = "HOST:PORT, for example 127.0.0.1:50051 or [::1]:50051 (an IPv6 host in brackets)"
"""What an address may be: the whole of the error message, so it never echoes the text."""

_MAX_ADDRESS_CHARS = 300
_MAX_HOST_CHARS = 255
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
# A label inet_aton reads as a number (decimal, octal or hex): a host of such labels only
# is an IPv4 address in disguise unless it is a dotted quad in its one spelling.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
# RFC 6874's ZoneID characters (unreserved): an interface name or index (`eth0`, `1`).
# Anything else in a zone id (`]`, `,`, `:`, `/`, non-ASCII) could end the host early in a
# gRPC target or URL, or smuggle a second address into a target list.
_ZONE_ID = re.compile(r"[A-Za-z0-9._~-]+")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (name, IPv4 or IPv6 address, without brackets) and a port (0: any free one)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """`text` as HOST:PORT (an IPv6 host in brackets), port 0 to 65535 without
        leading zeros; ValueError(ALLOWED) otherwise."""
        if not isinstance(text, str) or len(text) > _MAX_ADDRESS_CHARS or not text.isprintable():
            raise ValueError(ALLOWED)
        host, separator, port = text.rpartition(":")
        if not separator or not is_port(port) or not _is_host(host):
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
    """A host name, an IPv4 address, or an IPv6 address in brackets."""
    if len(text) > _MAX_HOST_CHARS:
        return False
    if text.startswith("[") and text.endswith("]"):
        _, percent, zone = text[1:-1].partition("%")
        if percent and _ZONE_ID.fullmatch(zone) is None:
            return False
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        pass
    else:
        return True
    if _HOSTNAME.fullmatch(text) is None:
        return False
    labels = text.removesuffix(".").split(".")
    return not all(_NUMERIC_LABEL.fullmatch(label) for label in labels)


def is_port(text: str) -> bool:
    """Whether `text` is a port number, 0 to 65535, in digits without leading zeros (but
    0 itself): the one spelling of a port in an address or a database URL."""
    return _PORT.fullmatch(text) is not None and int(text) <= 65535
