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

ALLOWED = (
    "HOST:PORT, for example 127.0.0.1:50051 or [::1]:50051 (an IPv6 host in brackets, "
    "a port from 0 to 65535 without leading zeros)"
)
"""What an address may be. A refusal is this and the reason (`AddressRefusal`), which names
the part at fault ("its port has a leading zero") and never echoes the text."""


class AddressRefusal(ValueError):
    """A text that is no HOST:PORT: `str()` is ALLOWED and the reason, `reason` the reason
    alone; neither holds any of the text."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{ALLOWED}: {reason}")
        self.reason = reason


_MAX_ADDRESS_CHARS = 300
_MAX_HOST_CHARS = 255
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_ASCII_DIGITS = re.compile(r"[0-9]+")
# A label inet_aton reads as a number (decimal, octal or hex): a host of such labels only
# is an IPv4 address in disguise unless it is a dotted quad in its one spelling.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
# RFC 6874's ZoneID characters (unreserved): an interface name or index (`eth0`, `1`).
# Anything else in a zone id (`]`, `,`, `:`, `/`, non-ASCII) could end the host early in a
# gRPC target or URL, or smuggle a second address into a target list.
_ZONE_ID = re.compile(r"[A-Za-z0-9._~-]+")
# `_` is allowed: Docker Compose service names may hold it (`auth_svc`) and glibc's
# getaddrinfo and gRPC bind and connect to such names; it ends no host in a target or URL.
_LABEL = re.compile(r"[A-Za-z0-9_-]+")
_MAX_LABEL_CHARS = 63


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (name, IPv4 or IPv6 address, without brackets) and a port (0: any free one)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """`text` as HOST:PORT (an IPv6 host in brackets), port 0 to 65535 without
        leading zeros; AddressRefusal (a ValueError) naming the part at fault otherwise."""
        if not isinstance(text, str):
            raise AddressRefusal("it is not text")
        if len(text) > _MAX_ADDRESS_CHARS:
            raise AddressRefusal(f"it is longer than {_MAX_ADDRESS_CHARS} characters")
        if not text.isprintable():
            raise AddressRefusal("it holds a control or invisible character")
        host, separator, port = text.rpartition(":")
        if not separator:
            raise AddressRefusal("it has no :PORT")
        _check_port(port)
        _check_host(host)
        return cls(_unbracketed(host), int(port))

    def __str__(self) -> str:
        """HOST:PORT again, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def with_port(self, port: int) -> HostPort:
        """The same host on `port` (the one bound when 0 was asked for)."""
        return HostPort(self.host, port)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The host as an IP address; None for a name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def is_loopback(self) -> bool:
        """Whether it binds only the loopback interface: `localhost` in any case (glibc
        matches /etc/hosts names case-insensitively) or a loopback address."""
        if self.host.lower() == "localhost":
            return True
        return self.ip is not None and self.ip.is_loopback


def _unbracketed(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_port(text: str) -> None:
    if not text:
        raise AddressRefusal("its port is empty")
    if _ASCII_DIGITS.fullmatch(text) is None:
        raise AddressRefusal("its port is not a number in the digits 0-9")
    if len(text) > 1 and text.startswith("0"):
        raise AddressRefusal("its port has a leading zero")
    if not is_port(text):
        raise AddressRefusal("its port is above 65535")


def _check_host(text: str) -> None:
    """A host name, an IPv4 address, or an IPv6 address in brackets; AddressRefusal if not."""
    if not text:
        raise AddressRefusal("its host is empty")
    if len(text) > _MAX_HOST_CHARS:
        raise AddressRefusal(f"its host is longer than {_MAX_HOST_CHARS} characters")
    if text.startswith("[") and text.endswith("]"):
        _check_ipv6(text[1:-1])
        return
    if "[" in text or "]" in text:
        raise AddressRefusal("its brackets do not enclose the whole host")
    if ":" in text:
        raise AddressRefusal("an IPv6 host goes in brackets, as in [::1]:50051")
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        pass
    else:
        return
    _check_name(text)


def _check_ipv6(inside: str) -> None:
    address, percent, zone = inside.partition("%")
    if percent and _ZONE_ID.fullmatch(zone) is None:
        raise AddressRefusal("its zone id holds a character other than letters, digits, -._~")
    try:
        ipv6 = ipaddress.IPv6Address(inside)
    except ValueError:
        try:
            _check_host(address)
        except AddressRefusal:
            raise AddressRefusal("its host in brackets is no IPv6 address") from None
        raise AddressRefusal("brackets are only for an IPv6 host") from None
    if ipv6.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 is 127.0.0.1 to a reader but not to the loopback test, and gRPC
        # fails to bind it ("invalid argument"): IPv4 is written as IPv4.
        raise AddressRefusal(
            "its host is an IPv4-mapped IPv6 address: write the IPv4 address, as in 127.0.0.1:50051"
        )


def _check_name(text: str) -> None:
    if not text.isascii():
        raise AddressRefusal(
            "its host name is not ASCII: write an internationalised name in its xn-- form"
        )
    labels = text.removesuffix(".").split(".")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        raise AddressRefusal(
            "its host is numbers but not a dotted quad: an IPv4 address is four numbers "
            "from 0 to 255 without leading zeros, as in 127.0.0.1"
        )
    for label in labels:
        if not label:
            raise AddressRefusal("its host name has an empty label (two dots in a row)")
        if len(label) > _MAX_LABEL_CHARS:
            raise AddressRefusal(
                f"a label of its host name is longer than {_MAX_LABEL_CHARS} characters"
            )
        if _LABEL.fullmatch(label) is None:
            raise AddressRefusal(
                "its host name holds a character other than letters, digits, '-', '_' and '.'"
            )
        if label.startswith("-") or label.endswith("-"):
            raise AddressRefusal("a label of its host name starts or ends with '-'")
    if text.endswith(".") and text[:-1].lower() == "localhost":
        # `localhost.` is looked up in DNS, not in /etc/hosts: no sure loopback address.
        raise AddressRefusal(
            "its host is localhost with a trailing dot, which is looked up in DNS rather "
            "than /etc/hosts: write localhost"
        )


def is_port(text: str) -> bool:
    """Whether `text` is a port number, 0 to 65535, in digits without leading zeros (but
    0 itself): the one spelling of a port in an address or a database URL."""
    return _PORT.fullmatch(text) is not None and int(text) <= 65535
