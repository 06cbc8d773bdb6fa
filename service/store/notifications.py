"""The revocation NOTIFY format, shared by the writer (store) and the listener (feed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from service.domain.revocation import Revocation, UserRevocation

log = logging.getLogger(__name__)

CHANNEL = "authsvc_revocations"
# Signing keys were added or retired: every replica reloads them (the payload is empty).
KEYS_CHANNEL = "authsvc_signing_keys"
# Every session of a user was revoked at once: [user id, generation, revoked at, bound].
USERS_CHANNEL = "authsvc_user_revocations"
# NOTIFY payloads are limited to 8000 bytes; ~75 bytes per session.
_SESSIONS_PER_NOTIFY = 100


def notify_payloads(revocations: Iterable[Revocation]) -> list[str]:
    """NOTIFY payloads announcing [session id, revoked at, access expires max] triples,
    each payload under the size limit. The third is what tells a listener how long to
    remember the revocation, so it travels with it."""
    items = [
        [r.session_id, round(r.revoked_at, 3), round(r.access_expires_max, 3)] for r in revocations
    ]
    return [
        json.dumps(items[i : i + _SESSIONS_PER_NOTIFY], separators=(",", ":"))
        for i in range(0, len(items), _SESSIONS_PER_NOTIFY)
    ]


def parse_payload(payload: str) -> list[Revocation]:
    """The inverse of `notify_payloads` for one payload; malformed input yields nothing."""
    try:
        items = json.loads(payload)
        return [Revocation(str(sid), float(at), float(until)) for sid, at, until in items]
    except (ValueError, TypeError):
        log.warning("ignored a malformed revocation notification")
        return []


def user_notify_payload(revocation: UserRevocation) -> str:
    """The NOTIFY payload announcing one user's revocation (a few dozen bytes)."""
    return json.dumps(
        [
            revocation.user_id,
            revocation.generation,
            round(revocation.revoked_at, 3),
            round(revocation.access_expires_max, 3),
        ],
        separators=(",", ":"),
    )


def parse_user_payload(payload: str) -> list[UserRevocation]:
    """The inverse of `user_notify_payload`; malformed input yields nothing."""
    try:
        user_id, generation, at, until = json.loads(payload)
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise TypeError("generation")
        return [UserRevocation(str(user_id), generation, float(at), float(until))]
    except (ValueError, TypeError):
        log.warning("ignored a malformed user revocation notification")
        return []
