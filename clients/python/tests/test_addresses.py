"""HostPort: HOST:PORT in the one spelling the service's settings (AUTH_LISTEN,
AUTH_METRICS_LISTEN) also take, since the service parses them with this very class: an
IPv6 host only in brackets, a port without leading zeros, a host that is no disguised
number."""

from __future__ import annotations

import pytest
from authsvc_client import addresses
from authsvc_client.addresses import HostPort, is_port


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("[::1]:0", "::1", 0),
        ("[::]:9464", "::", 9464),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80),
        ("localhost:0", "localhost", 0),
        ("db-1.internal:5432", "db-1.internal", 5432),
        ("1password.example:443", "1password.example", 443),
        ("auth.internal:65535", "auth.internal", 65535),
    ],
)
def test_host_and_port_in_their_one_spelling_are_accepted(text: str, host: str, port: int) -> None:
    address = HostPort.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text  # written back as read


@pytest.mark.parametrize(
    "text",
    [
        # Unbracketed IPv6: `::1:0` is host ::1 port 0, or host ::1:0 and no port? gRPC
        # and URLs write it [::1]:0, and so must a setting.
        "::1:0",
        "::1:9464",
        ":::50051",
        "fe80::1:80",
        # Brackets are for IPv6 only.
        "[127.0.0.1]:80",
        "[localhost]:80",
        "[::1:0",
        # Leading zeros in the port (the service's settings refused them; now both do).
        "127.0.0.1:0080",
        "[::1]:00",
        "localhost:065535",
        # Numbers that getaddrinfo reads as IPv4 in other spellings (inet_aton's): a host
        # of numbers is a dotted quad in its one spelling.
        "127.1:80",
        "2130706433:80",
        "0x7f.0.0.1:80",
        "0177.0.0.1:80",
        "127.0.0.01:80",
        "1.0x7f:80",
    ],
)
def test_ambiguous_spellings_are_refused_without_echo(text: str) -> None:
    with pytest.raises(ValueError, match=r"^HOST:PORT") as refused:
        HostPort.parse(text)
    assert str(refused.value) == addresses.ALLOWED


def test_a_port_is_digits_without_leading_zeros_up_to_65535() -> None:
    for good in ("0", "1", "80", "65535"):
        assert is_port(good)
    for bad in ("", "00", "0080", "65536", "+80", "8 0", "٨٠", "99999999999999999999"):
        assert not is_port(bad), bad
