"""The revocation log's wake-up: NOTIFY on `LOG_CHANNEL` says "the log advanced to N",
never what was revoked (a listener reads the log for that). Sent on commit by the log's
trigger (migration 0011), one per row appended."""

from __future__ import annotations

LOG_CHANNEL = "authsvc_revocation_log"


def parse_log_position(payload: object) -> int | None:
    """The sequence a notification announces; None for anything else (never raises)."""
    if not isinstance(payload, str) or not payload.isascii() or not payload.isdigit():
        return None
    if len(payload) > 19:  # beyond bigint: not ours
        return None
    return int(payload)
