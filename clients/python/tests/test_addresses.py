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
    assert str(refused.value).startswith(f"{addresses.ALLOWED}: ")
    assert text not in str(refused.value)


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
    with pytest.raises(addresses.AddressRefusal, match=r"^HOST:PORT") as refused:
        HostPort.parse(text)
    assert str(refused.value) == f"{addresses.ALLOWED}: {refused.value.reason}"
    assert "zone id" in refused.value.reason or "control" in refused.value.reason


@pytest.mark.parametrize("zone", ["eth0", "lo", "enp0s31f6", "1", "br-1.a_b~c"])
def test_a_zone_id_of_rfc_6874s_characters_is_accepted(zone: str) -> None:
    address = HostPort.parse(f"[fe80::1%{zone}]:80")
    assert address.host == f"fe80::1%{zone}"
    assert str(address) == f"[fe80::1%{zone}]:80"


def test_a_zone_id_cannot_smuggle_a_second_address_into_a_grpc_target() -> None:
    with pytest.raises(ValueError, match="IP:PORT"):
        addresses_target(["[fe80::1%x,[::1]:50051]:9"])
    assert addresses_target(["[fe80::1%eth0]:9"]) == "ipv6:[fe80::1%eth0]:9"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.1:0", "its host is numbers but not a dotted quad"),
        ("0x7f.0.0.1:0", "its host is numbers but not a dotted quad"),
        ("2130706433:0", "its host is numbers but not a dotted quad"),
        ("127.0.0.01:0", "its host is numbers but not a dotted quad"),
        ("127.0.0.1:050051", "its port has a leading zero"),
        ("127.0.0.1:00", "its port has a leading zero"),
        ("[::1]:65536", "its port is above 65535"),
        ("127.0.0.1:99999999999999999999", "its port is above 65535"),
        ("127.0.0.1:", "its port is empty"),
        ("127.0.0.1:+1", "its port is not a number in the digits 0-9"),
        ("127.0.0.1:\u0665\u0660", "its port is not a number in the digits 0-9"),
        ("127.0.0.1", "it has no :PORT"),
        (":50051", "its host is empty"),
        ("[127.0.0.1]:0", "brackets are only for an IPv6 host"),
        ("[localhost]:0", "brackets are only for an IPv6 host"),
        ("[*]:0", "its host in brackets is no IPv6 address"),
        ("[::1]]:0", "its host in brackets is no IPv6 address"),
        ("[::1:0", "its brackets do not enclose the whole host"),
        ("::1:0", "an IPv6 host goes in brackets"),
        ("a..b:0", "its host name has an empty label"),
        ("-bad-host:0", "starts or ends with '-'"),
        ("a" * 64 + ".example:0", "longer than 63 characters"),
        ("host name:0", "a character other than letters, digits"),
        ("*:0", "a character other than letters, digits"),
        ("\u00e9x.example:0", "not ASCII: write an internationalised name in its xn-- form"),
        ("a\tb:0", "a control or invisible character"),
        ("a" * 301 + ":0", "longer than 300 characters"),
    ],
)
def test_a_refusal_names_the_part_at_fault_without_echoing_the_text(text: str, reason: str) -> None:
    """One generic line for every mistake left the reader to guess which part was wrong;
    the reason names the part ("its port has a leading zero"), never the text."""
    with pytest.raises(addresses.AddressRefusal) as refused:
        HostPort.parse(text)
    message = str(refused.value)
    assert message.startswith(f"{addresses.ALLOWED}: "), message
    assert reason in message, message
    assert text not in refused.value.reason


def test_allowed_states_the_port_range_and_the_leading_zero_rule() -> None:
    assert "0 to 65535" in addresses.ALLOWED
    assert "without leading zeros" in addresses.ALLOWED


@pytest.mark.parametrize("text", ["host_name:0", "auth_svc:50051", "db_1.internal:5432"])
def test_an_underscore_in_a_host_name_is_accepted(text: str) -> None:
    """Docker Compose service names may hold `_`; glibc's getaddrinfo and gRPC bind and
    connect to such names (checked with an /etc/hosts entry `127.0.0.1 auth_svc`)."""
    assert str(HostPort.parse(text)) == text


@pytest.mark.parametrize("text", ["localhost:0", "LOCALHOST:0", "LocalHost:50051"])
def test_localhost_in_any_case_is_loopback(text: str) -> None:
    """/etc/hosts names match case-insensitively: LOCALHOST binds 127.0.0.1 as localhost does,
    and start-up refused it as "not a loopback address"."""
    assert HostPort.parse(text).is_loopback


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # `localhost.` is a DNS lookup (getaddrinfo fails here, no /etc/hosts entry): no
        # sure loopback address, so neither loopback nor network: refused, saying why.
        ("localhost.:0", "localhost with a trailing dot"),
        ("LOCALHOST.:50051", "localhost with a trailing dot"),
        # 127.0.0.1 in IPv6 clothing: not loopback to ipaddress, "invalid argument" at bind.
        ("[::ffff:127.0.0.1]:0", "IPv4-mapped IPv6 address: write the IPv4 address"),
        ("[::FFFF:127.0.0.1]:0", "IPv4-mapped IPv6 address: write the IPv4 address"),
        ("[::ffff:7f00:1]:9464", "IPv4-mapped IPv6 address: write the IPv4 address"),
        ("[::ffff:10.0.0.5]:50051", "IPv4-mapped IPv6 address: write the IPv4 address"),
    ],
)
def test_hosts_of_unsure_loopback_are_refused_saying_why(text: str, reason: str) -> None:
    with pytest.raises(addresses.AddressRefusal) as refused:
        HostPort.parse(text)
    assert reason in refused.value.reason
    assert text not in str(refused.value)


def test_a_name_with_a_trailing_dot_other_than_localhost_is_accepted() -> None:
    assert str(HostPort.parse("example.com.:443")) == "example.com.:443"
    assert not HostPort.parse("example.com.:443").is_loopback
