"""Keeping what clients can repeat cheaply from growing the audit trail and the logs.

Security events a client can trigger at will (throttled or failed logins, replays of
rotated refresh tokens, refused admin calls) carry an aggregation key: the store counts
repeats of one kind and key within one window in one row (first and last time, count).
Their log lines go through a `LogRateLimiter`: one line per kind and key per window, the
next one saying how many were left out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from urllib.parse import unquote

# Shared with the client package (its interceptor limits its own lines the same way).
from authsvc_client.limited_log import MAX_LOG_KEYS, LogRateLimiter

__all__ = ["MAX_LOG_KEYS", "LogRateLimiter", "aggregate_key", "capped", "peer_address"]

MAX_STORED_TEXT = 64
"""Client-chosen text (a username) is stored in an event's detail cut to this length."""


def capped(text: str, limit: int = MAX_STORED_TEXT) -> str:
    """`text`, cut to `limit` characters (marked with "…" when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def peer_address(peer: str | None) -> str:
    """The source a gRPC peer string names, one key per client: its address without the
    port (every new connection has a new port, so the port tells no source apart); an
    IPv4 address also when it comes IPv4-mapped over IPv6; an IPv6 address as its /64
    (one subscriber's usual allocation, so a client cannot take a fresh source for each
    of its addresses). "ipv4:192.0.2.7:5000" -> "ipv4:192.0.2.7",
    "ipv6:%5B2001:db8::1%5D:5000" -> "ipv6:2001:db8::/64"; a Unix socket is itself; "-"
    for none. The one parser of peers: throttle keys, event aggregation, rate-limited log
    lines, stream budgets and replay verdicts all count sources by it."""
    if not peer:
        return "-"
    scheme, _, rest = peer.partition(":")
    address, _, port = unquote(rest).rpartition(":")
    if not (address and port.isdigit()):
        return peer
    if scheme not in ("ipv4", "ipv6"):
        return f"{scheme}:{address}"
    try:
        ip = ipaddress.ip_address(address.strip("[]").partition("%")[0])
    except ValueError:
        return f"{scheme}:{address}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return f"ipv4:{ip}"
    return f"ipv6:{ipaddress.IPv6Network((ip, 64), strict=False)}"


def aggregate_key(*parts: str | None) -> str:
    """A fixed-size key for the store from an event's source and key parts (usernames
    included whole: two long ones sharing a prefix are not merged)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
