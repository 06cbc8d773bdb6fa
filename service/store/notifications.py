"""The revocation NOTIFY format, shared by the writer (store) and the listener (feed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

CHANNEL = "authsvc_revocations"
# Signing keys were added or retired: every replica reloads them (the payload is empty).
KEYS_CHANNEL = "authsvc_signing_keys"
# NOTIFY payloads are limited to 8000 bytes; ~60 bytes per session.
_SESSIONS_PER_NOTIFY = 100


def notify_payloads(revocations: Iterable[tuple[str, float]]) -> list[str]:
    """NOTIFY payloads announcing (session id, revoked at) pairs, each under the size limit."""
    items = [[sid, round(at, 3)] for sid, at in revocations]
    return [
        json.dumps(items[i : i + _SESSIONS_PER_NOTIFY], separators=(",", ":"))
        for i in range(0, len(items), _SESSIONS_PER_NOTIFY)
    ]


def parse_payload(payload: str) -> list[tuple[str, float]]:
    """The inverse of `notify_payloads` for one payload; malformed input yields nothing."""
    try:
        items = json.loads(payload)
        return [(str(sid), float(at)) for sid, at in items]
    except (ValueError, TypeError):
        log.warning("ignored a malformed revocation notification")
        return []
