"""The PostgreSQL store: every part (one per kind of data, each in its own module) over
one pool. Every SQL statement of the service lives in `service.store`."""

from __future__ import annotations

from service.store.clock import PostgresClock
from service.store.events import PostgresSecurityEvents
from service.store.janitor import PostgresJanitor
from service.store.refresh_tokens import PostgresRefreshTokens
from service.store.sessions import PostgresSessions
from service.store.shared_settings import PostgresSharedSettings
from service.store.signing_keys import PostgresSigningKeys
from service.store.throttle import PostgresThrottle
from service.store.users import PostgresUsers


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
    """All persistence of authsvc: it implements every port of `service.domain.ports`,
    over one pool (each part takes the same pool, timeout and event window)."""
