"""Persistence: PostgreSQL through asyncpg, SQL in one module, migrations as ordered .sql files."""

from service.store.migrations import MigrationRefused, apply_migrations
from service.store.postgres import UNAVAILABLE_ERRORS, PostgresStore

__all__ = ["UNAVAILABLE_ERRORS", "MigrationRefused", "PostgresStore", "apply_migrations"]
