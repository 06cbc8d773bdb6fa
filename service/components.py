"""The domain objects of one process, built from the settings over an open database:
the store, tokens, users, signing keys and their key material, the janitor, and the
database's clock every decision uses (docs/operations.md, "Clocks").

`build_components` is what `serve` wires into the gRPC server (`service.server`);
`open_components` gives the same objects to one-shot commands (`authsvc users`, `keys`,
`events`, `settings`) and the load tools.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from authsvc_client.token_check import VerifiedTokenCache

from service.clock import (
    Clock,
    ClockReading,
    ClockSkewTooLarge,
    DatabaseClock,
    describe_skew,
    judge_skew,
)
from service.database import open_database
from service.domain.access_tokens import AccessClaims, AccessTokenCodec
from service.domain.janitor import Janitor
from service.domain.login import PasswordLogins
from service.domain.passwords import PasswordHasher
from service.domain.policy import TokenPolicy
from service.domain.refresh_secret import load_refresh_secret, open_refresh_secret
from service.domain.revocation import RevocationState
from service.domain.sessions import RevokeService, SessionRevocations
from service.domain.shared_settings import check_shared_settings
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import NoTelemetry, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.tokens import TokenService
from service.domain.users import UserDirectory
from service.domain.validation import AccessTokenValidator
from service.failures import ConfigurationError, KekMissing
from service.secrets_box import SecretBox, load_or_create_kek_file
from service.settings import Settings
from service.store import PostgresStore

log = logging.getLogger(__name__)

# Readings of the database's clock per measurement; the shortest round trip counts.
_CLOCK_READINGS = 5


def key_encryption_key(settings: Settings) -> bytes:
    """AUTH_KEK; with the embedded database only, the KEK file in AUTH_DATA_DIR (created
    with mode 0600 on first use: `make run` needs no configuration).

    With AUTH_DATABASE_URL the KEK must be given: a key invented here, in whatever
    directory a command happens to run, would seal key material no other replica opens.
    Only `serve` and `keys rotate` call this (other commands need no key material).
    """
    if settings.kek is not None:
        return settings.kek
    if settings.database_url is not None:
        raise KekMissing()
    try:
        return load_or_create_kek_file(settings.data_dir / "kek")
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # A file where the directory should be, no such parent, no permission: the
        # operator's to fix (one line, exit 2), as the embedded PostgreSQL's own check says.
        raise ConfigurationError(
            f"AUTH_DATA_DIR: cannot hold the KEK file there ({exc.strerror})"
        ) from None


@dataclass(frozen=True)
class Components:
    """The domain objects of one process, built from settings, a pool and a clock."""

    store: PostgresStore
    tokens: TokenService
    validator: AccessTokenValidator
    revoke: RevokeService
    logins: PasswordLogins
    users: UserDirectory
    hasher: PasswordHasher
    revocations: RevocationState
    token_cache: VerifiedTokenCache[AccessClaims]
    signing_keys: SigningKeys
    janitor: Janitor
    clock: Clock

    def close(self) -> None:
        self.hasher.close()


def _signing_keys(
    settings: Settings,
    store: PostgresStore,
    box: SecretBox | None,
    clock: Clock,
    telemetry: Telemetry,
) -> SigningKeys:
    return SigningKeys(
        store=store,
        box=box,
        clock=clock,
        alg=settings.signing_alg,
        access_ttl=settings.access_ttl,
        leeway=settings.leeway,
        telemetry=telemetry,
    )


async def load_key_material(
    store: PostgresStore, signing_keys: SigningKeys, box: SecretBox, clock: Clock
) -> bytes:
    """The signing keys (loaded into `signing_keys`) and the refresh secret (returned),
    creating them on first start.

    Everything stored is opened before anything is created, so a wrong KEK stops us
    (KeyDecryptionError) before it seals a new key beside ones it cannot open.
    """
    await open_refresh_secret(store, box)
    await signing_keys.load()
    return await load_refresh_secret(store, box, clock=clock)


async def prepare_key_material(settings: Settings, pool: asyncpg.Pool, clock: Clock) -> None:
    """What `serve --workers N` checks (and creates on first start) before it starts any
    worker: a missing or wrong KEK is then one line from the supervisor."""
    store = PostgresStore(pool, timeout=settings.db_timeout)
    box = SecretBox(key_encryption_key(settings))
    keys = _signing_keys(settings, store, box, clock, NoTelemetry())
    await load_key_material(store, keys, box, clock)


async def build_components(
    settings: Settings,
    *,
    pool: asyncpg.Pool,
    clock: Clock,
    telemetry: Telemetry | None = None,
    key_material: bool = True,
) -> Components:
    """Everything but the revocation feed (the CLI needs no feed).

    Without `key_material` (operators' commands that do not sign, verify or create keys)
    no KEK is needed and nothing is opened or created: `tokens` then only revokes.
    """
    telemetry = telemetry or NoTelemetry()
    store = PostgresStore(
        pool,
        timeout=settings.db_timeout,
        event_window=settings.event_aggregation_window,
        clock=clock,
    )
    policy = TokenPolicy.from_settings(settings)
    revocations = RevocationState()
    token_cache = VerifiedTokenCache[AccessClaims](settings.token_cache_size)
    box = SecretBox(key_encryption_key(settings)) if key_material else None
    signing_keys = _signing_keys(settings, store, box, clock, telemetry)
    refresh_secret = None
    if box is not None:
        refresh_secret = await load_key_material(store, signing_keys, box, clock)
    # Reads the key ring from `signing_keys` at each use (never loaded without key
    # material: such a process signs and verifies nothing).
    codec = AccessTokenCodec(
        issuer=settings.issuer, keys=signing_keys, clock=clock, leeway=settings.leeway
    )
    # As many hashing threads as cores in every worker: at the lowest priority
    # they take only idle CPU, so one busy worker may use all of it.
    hasher = PasswordHasher(threads=os.cpu_count() or 1)
    session_revocations = SessionRevocations(
        sessions=store, state=revocations, clock=clock, telemetry=telemetry
    )
    validator = AccessTokenValidator(
        codec=codec, cache=token_cache, revocations=revocations, signing_keys=signing_keys
    )
    logins = PasswordLogins(
        users=store,
        events=store,
        hasher=hasher,
        clock=clock,
        throttle=(
            LoginThrottle.from_settings(settings, store=store, clock=clock)
            if settings.login_throttle
            else None
        ),
        telemetry=telemetry,
        log_window=policy.log_window,
    )
    tokens = TokenService(
        policy=policy,
        sessions=store,
        refresh_tokens=store,
        logins=logins,
        revocations=session_revocations,
        codec=codec,
        refresh_secret=refresh_secret,
        clock=clock,
        telemetry=telemetry,
    )
    revoke = RevokeService(
        sessions=store,
        events=store,
        revocations=session_revocations,
        validator=validator,
        clock=clock,
        log_window=policy.log_window,
    )
    users = UserDirectory(store=store, hasher=hasher, revocations=session_revocations, clock=clock)
    return Components(
        store=store,
        tokens=tokens,
        validator=validator,
        revoke=revoke,
        logins=logins,
        users=users,
        hasher=hasher,
        revocations=revocations,
        token_cache=token_cache,
        signing_keys=signing_keys,
        janitor=Janitor(
            settings=settings, store=store, keys=signing_keys, clock=clock, telemetry=telemetry
        ),
        clock=clock,
    )


@asynccontextmanager
async def open_components(
    settings: Settings, *, key_material: bool = False, acting_for_all: str | None = None
) -> AsyncIterator[Components]:
    """The components over the configured database, for one-shot commands such as
    `authsvc users` and the load tool's seeding; closed on exit.

    The schema must be this binary's (they migrate nothing: `SchemaMismatch` otherwise).
    Key material is opened (and created on first use) only if asked for. A command that
    acts for every replica says what it does in `acting_for_all`: it is refused
    (`SharedSettingsMismatch`) if our shared settings are not the recorded ones, before
    anything is opened. No command records them: only `serve` does.
    """
    async with open_database(settings) as database:
        pool = database.pool
        if acting_for_all is not None:
            store = PostgresStore(pool, timeout=settings.db_timeout)
            await check_shared_settings(store, settings, doing=acting_for_all)
        # The database's time, as the servers use: an admin command's key schedule or
        # event window must not depend on this host's clock (too far off: a warning).
        clock = await start_database_clock(settings, pool, refuse=False)
        components = await build_components(
            settings, pool=pool, clock=clock, key_material=key_material
        )
        try:
            yield components
        finally:
            components.close()


async def start_database_clock(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    refuse: bool = True,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> DatabaseClock:
    """The database's clock, measured once; raises ClockSkewTooLarge (with `refuse`) when
    this host's wall clock is past AUTH_CLOCK_SKEW_MAX from it, and warns past
    AUTH_CLOCK_SKEW_WARN. `wall` and `monotonic` are this host's clocks (tests skew them)."""
    store = PostgresStore(pool, timeout=settings.db_timeout)

    async def take_readings() -> list[ClockReading]:
        return await store.clock_readings(_CLOCK_READINGS, monotonic=monotonic, wall=wall)

    clock = DatabaseClock(take_readings, monotonic=monotonic)
    offset = await clock.measure()
    verdict = judge_skew(
        offset.wall_skew, warn=settings.clock_skew_warn, limit=settings.clock_skew_max
    )
    if verdict == "refuse" and refuse:
        raise ClockSkewTooLarge(offset.wall_skew, settings.clock_skew_max)
    if verdict != "ok":
        log.warning(
            "this host's clock is %s the database's (AUTH_CLOCK_SKEW_WARN=%gs); "
            "the service uses the database's time",
            describe_skew(offset.wall_skew),
            settings.clock_skew_warn,
        )
    return clock
