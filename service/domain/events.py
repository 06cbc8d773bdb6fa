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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

MAX_STORED_TEXT = 64
"""Client-chosen text (a username) is stored in an event's detail cut to this length."""

MAX_LOG_KEYS = 1024
"""Keys a `LogRateLimiter` remembers; beyond, new keys share one line per window."""

_OVERFLOW_KEY = ("*",)


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


@dataclass(slots=True)
class _Window:
    started: float
    suppressed: int = 0


class LogRateLimiter:
    """Log lines rate-limited per key: the first line of a key in a window is
    written, the others are counted, and the key's next written line (in a later window)
    says how many were suppressed. Memory is bounded by `max_keys`."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        window: float,
        now: Callable[[], float],
        max_keys: int = MAX_LOG_KEYS,
    ) -> None:
        self._log = log
        self._window = window
        self._now = now
        self._max_keys = max_keys
        self._windows: dict[tuple[str | None, ...], _Window] = {}

    def warning(self, key: tuple[str | None, ...], message: str, *args: object) -> None:
        """Log `message % args` at WARNING unless `key` had a line within the window."""
        self._emit(logging.WARNING, key, message, args)

    def error(self, key: tuple[str | None, ...], message: str, *args: object) -> None:
        """Log `message % args` at ERROR unless `key` had a line within the window."""
        self._emit(logging.ERROR, key, message, args)

    def _emit(
        self, level: int, key: tuple[str | None, ...], message: str, args: tuple[object, ...]
    ) -> None:
        now = self._now()
        if key not in self._windows and len(self._windows) >= self._max_keys:
            self._forget_ended(now)
            if len(self._windows) >= self._max_keys:
                key = _OVERFLOW_KEY
        window = self._windows.get(key)
        if window is not None and now - window.started < self._window:
            window.suppressed += 1
            return
        suppressed = 0 if window is None else window.suppressed
        # Re-inserted at the end: the dict stays ordered by window start, oldest first.
        self._windows.pop(key, None)
        self._windows[key] = _Window(started=now)
        if suppressed:
            self._log.log(level, message + " (%d more suppressed)", *args, suppressed)
        else:
            self._log.log(level, message, *args)

    def _forget_ended(self, now: float) -> None:
        """Drop keys whose window has ended (the oldest first), with one line for what
        they had suppressed."""
        suppressed = sources = 0
        while self._windows:
            key = next(iter(self._windows))
            window = self._windows[key]
            if now - window.started < self._window:
                break
            del self._windows[key]
            if window.suppressed:
                suppressed += window.suppressed
                sources += 1
        if suppressed:
            self._log.warning(
                "security: %d more warnings suppressed (%d sources)", suppressed, sources
            )
