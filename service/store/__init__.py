"""Persistence: PostgreSQL through asyncpg. Every SQL statement lives here, in one module
per kind of data (users, sessions, refresh tokens, signing keys, throttle counts, security
events, shared settings, the janitor's batches) on a shared base (`base`); `PostgresStore`
composes them. Migrations are ordered .sql files."""

from service.store.base import UNAVAILABLE_ERRORS
from service.store.migrations import MigrationRefused, apply_migrations
from service.store.postgres import PostgresStore

__all__ = ["UNAVAILABLE_ERRORS", "MigrationRefused", "PostgresStore", "apply_migrations"]
