"""The PostgreSQL store: every part (one per kind of data, each in its own module) over
one pool. Every SQL statement of the service lives in `service.store`."""

from __future__ import annotations

from service.domain.ports import PurgeBatch
from service.store.base import BOOTSTRAP_LOCK_ID as _BOOTSTRAP_LOCK_ID
from service.store.base import UNAVAILABLE_ERRORS
from service.store.clock import PostgresClock
from service.store.events import PostgresSecurityEvents
from service.store.janitor import (
    _PURGE_SQL,
    BACKFILL_PURGE_AFTER_SQL,
    PostgresJanitor,
    Purger,
)
from service.store.refresh_tokens import LOCK_REFRESH_TOKEN_SQL, ROTATE_SQL, PostgresRefreshTokens
from service.store.revocations import SESSION_PURGE_AFTER
from service.store.sessions import PostgresSessions
from service.store.shared_settings import PostgresSharedSettings
from service.store.signing_keys import PostgresSigningKeys
from service.store.throttle import PostgresThrottle
from service.store.users import PostgresUsers

__all__ = [
    "BACKFILL_PURGE_AFTER_SQL",
    "LOCK_REFRESH_TOKEN_SQL",
    "ROTATE_SQL",
    "SESSION_PURGE_AFTER",
    "UNAVAILABLE_ERRORS",
    "_BOOTSTRAP_LOCK_ID",
    "_PURGE_SQL",
    "PostgresStore",
    "PurgeBatch",
    "Purger",
]


class PostgresStore(
    PostgresUsers,
    PostgresSessions,
    PostgresRefreshTokens,
    PostgresSigningKeys,
    PostgresSharedSettings,
    PostgresThrottle,
    PostgresSecurityEvents,
    PostgresJanitor,
    PostgresClock,
):
    """All persistence of authsvc."""
