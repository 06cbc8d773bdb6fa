"""Log lines rate-limited per key, so that what a peer can repeat cheaply (refused calls,
failed logins) costs one line per key and window, the next one saying how many were left
out. Used by the server and by this package's interceptor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

MAX_LOG_KEYS = 1024
"""Keys a `LogRateLimiter` remembers; beyond, new keys share one line per window."""

_OVERFLOW_KEY = ("*",)


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
