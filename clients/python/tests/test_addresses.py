"""HostPort: HOST:PORT in the one spelling the service's settings (AUTH_LISTEN,
AUTH_METRICS_LISTEN) also take, since the service parses them with this very class: an
IPv6 host only in brackets, a port without leading zeros, a host that is no disguised
number."""

from __future__ import annotations

import pytest
from authsvc_client import addresses
from authsvc_client.addresses import HostPort, is_port
from authsvc_client.channel import addresses_target


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


@pytest.mark.parametrize(
    "text",
    [
        "[fe80::1%x,[::1]:50051]:9",  # a second address smuggled into a gRPC target
        "[::1%x]y]:0",  # a bracket inside the zone id: counted as loopback
        "[::1%a:b]:0",
        "[::1%a/b]:0",
        "[::1%a\tb]:0",
        "[::1%\u00e9]:0",
        "[::1%\u0661]:0",
        "[::1%]:0",
        "[fe80::1%eth0%1]:80",
    ],
)
def test_a_zone_id_outside_rfc_6874s_characters_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^HOST:PORT") as refused:
        HostPort.parse(text)
    assert str(refused.value) == addresses.ALLOWED


@pytest.mark.parametrize("zone", ["eth0", "lo", "enp0s31f6", "1", "br-1.a_b~c"])
def test_a_zone_id_of_rfc_6874s_characters_is_accepted(zone: str) -> None:
    address = HostPort.parse(f"[fe80::1%{zone}]:80")
    assert address.host == f"fe80::1%{zone}"
    assert str(address) == f"[fe80::1%{zone}]:80"


def test_a_zone_id_cannot_smuggle_a_second_address_into_a_grpc_target() -> None:
    with pytest.raises(ValueError, match="IP:PORT"):
        addresses_target(["[fe80::1%x,[::1]:50051]:9"])
    assert addresses_target(["[fe80::1%eth0]:9"]) == "ipv6:[fe80::1%eth0]:9"
