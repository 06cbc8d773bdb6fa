"""Settings that every replica on one database must share, recorded in the database.

Replicas that disagree on, say, `AUTH_ISSUER` each refuse the other's tokens: behind a
load balancer that is an intermittent failure nobody can explain. So the first
`authsvc serve` records the values of `SHARED_SETTINGS`, every later one compares its own
and refuses to start on a difference (one line naming each setting with both values), and
`authsvc settings adopt` is the one way to change them for every replica: a security event
and a log line name the old and the new values.

A replica already running when they are changed keeps serving (a rolling change must not
take the old replicas out of the balancer before their replacements are up): on its next
check it logs a warning, reports NOT_SERVING on the `authsvc.settings` health service and
leaves the database-wide clean-up to replicas that agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from service.clock import Clock, to_datetime
from service.domain.ports import SharedSettingsStorage
from service.domain.records import SecurityEvent
from service.failures import ConfigurationError
from service.settings import Settings, declarations

log = logging.getLogger(__name__)

SHARED_SETTINGS: Final[tuple[str, ...]] = (
    # Every replica puts it in its tokens and demands it of every token it validates:
    # replicas with different issuers refuse each other's tokens.
    "issuer",
    # The `aud` of tokens whose Issue named none: with different ones, whether a token
    # passes Validate's audience check depends on the replica that issued it.
    "audience",
    # The audiences Issue may name: a login refused by one replica and granted by the next,
    # and sessions refreshed by some replicas only.
    "audiences",
    # The algorithm of every key a replica creates (the first one, each rotation, by
    # whichever replica's janitor is due): clients that expect one would break.
    "signing_alg",
    # How long access tokens live; also when a superseded key may be retired (by any
    # replica): a replica with a shorter one retires keys that still sign live tokens.
    "access_ttl",
    # Clock skew on exp/nbf/iat: a token near its expiry valid on one replica and
    # expired on the next.
    "leeway",
    # A session's lifetimes, set by whichever replica issues or rotates: the session
    # would end at a time that depends on the balancer.
    "refresh_idle_ttl",
    "refresh_absolute_ttl",
    # A replay of a rotated token within the window is a retry on one replica and theft
    # (the family revoked) on another.
    "refresh_reuse_grace",
    # How many sessions a login leaves a user: with different caps, the real one would be
    # whichever replica answered.
    "max_sessions_per_user",
    # Failures are counted in the database but judged by the replica that answers: the
    # most lenient replica would be the policy an attacker gets by retrying.
    "login_throttle",
    "throttle_user_failures",
    "throttle_peer_failures",
    "throttle_max_delay",
    "throttle_window",
    # Database-wide upkeep done by whichever replica's janitor holds the lock: the
    # rotation period and how long security events are kept would depend on which.
    "key_rotation_period",
    "event_retention",
)
"""`Settings` field names whose values every replica on one database must share.

Safe to differ, so not here: per-process limits and budgets (`max_*`, `token_cache_size`,
`db_pool_size`, `db_timeout`, `workers`), the listen and metrics addresses, TLS and the
calling services (each replica's own network exposure), logging, and the intervals of
per-process work (janitor, revocation polls). Secrets never are (`AUTH_KEK` is checked by
opening what it sealed): the values are stored in clear and printed in error lines.
"""

SharedValue = str | int | float | bool | list[Any] | None


def variable_name(name: str) -> str:
    """The environment variable of a Settings field (`issuer` -> `AUTH_ISSUER`), from its
    one declaration."""
    return dict(declarations())[name].variable


def _json_value(value: object) -> SharedValue:
    if isinstance(value, frozenset | set | tuple | list):
        return sorted(_json_value(v) for v in value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def shared_values(settings: Settings) -> dict[str, SharedValue]:
    """The values of `SHARED_SETTINGS` in `settings`, as JSON values (sets sorted)."""
    return {name: _json_value(getattr(settings, name)) for name in SHARED_SETTINGS}


def shown(value: SharedValue) -> str:
    """A value as one line (JSON: control characters escaped, strings quoted), a switch
    spelled as its variable takes it (on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class Difference:
    """One shared setting whose value here is not the recorded one."""

    name: str
    recorded: SharedValue
    here: SharedValue

    @property
    def variable(self) -> str:
        return variable_name(self.name)

    def describe(self) -> str:
        return f"{self.variable} is {shown(self.here)} here but {shown(self.recorded)} shared"


def differences(
    recorded: Mapping[str, SharedValue], here: Mapping[str, SharedValue]
) -> list[Difference]:
    """The settings of `here` recorded with another value. A setting not recorded yet is
    no difference (it is recorded), nor is a recorded name this release does not know."""
    return [
        Difference(name, recorded[name], value)
        for name, value in here.items()
        if name in recorded and recorded[name] != value
    ]


class SharedSettingsMismatch(ConfigurationError):
    """This process's shared settings are not the ones recorded in the database (exit 2)."""

    def __init__(self, found: list[Difference], *, doing: str = "refusing to start") -> None:
        super().__init__(
            "settings every replica on this database must share differ from those recorded "
            f"there ({doing}): {'; '.join(d.describe() for d in found)}. Use the shared "
            "values, or change them for every replica with `authsvc settings adopt` run "
            "with the new ones (see docs/operations.md, Deploying and scaling out)"
        )
        self.differences = found


async def agree_on_shared_settings(
    store: SharedSettingsStorage, settings: Settings, *, clock: Clock
) -> None:
    """What `serve` does once its key material is open: record the shared settings not
    recorded yet (all of them on the first start), under the lock of the other first-start
    work, unless a recorded value differs from ours (`SharedSettingsMismatch`: another
    replica may have recorded its own since we compared)."""
    here = shared_values(settings)
    found: list[Difference] = []
    added: list[str] = []

    def decide(
        recorded: Mapping[str, SharedValue],
    ) -> tuple[dict[str, SharedValue], SecurityEvent | None]:
        found[:] = differences(recorded, here)
        added[:] = [] if found else [n for n in here if n not in recorded]
        if not added:
            return {}, None
        event = SecurityEvent(
            kind="shared_settings_recorded",
            detail={variable_name(n): shown(here[n]) for n in added},
        )
        return {n: here[n] for n in added}, event

    await store.update_shared_settings(decide, now=to_datetime(clock.now()))
    if found:
        raise SharedSettingsMismatch(found)
    if added:
        log.info(
            "recorded the shared settings: %s",
            ", ".join(f"{variable_name(n)}={shown(here[n])}" for n in added),
        )


async def check_shared_settings(
    store: SharedSettingsStorage, settings: Settings, *, doing: str = "refusing to start"
) -> None:
    """Refuse (`SharedSettingsMismatch`) to start, or to act on every replica's behalf
    (`keys rotate`, `keys retire`), with other values than the recorded ones; records
    nothing."""
    found = differences(await store.shared_settings(), shared_values(settings))
    if found:
        raise SharedSettingsMismatch(found, doing=doing)


async def adopt_shared_settings(
    store: SharedSettingsStorage, settings: Settings, *, clock: Clock, actor: str
) -> list[Difference]:
    """Record this environment's values as the shared ones; the settings changed (and a
    security event and a warning naming old and new values if any did)."""
    here = shared_values(settings)
    changed: list[Difference] = []

    def decide(
        recorded: Mapping[str, SharedValue],
    ) -> tuple[dict[str, SharedValue], SecurityEvent | None]:
        changed[:] = [
            Difference(name, recorded.get(name), value)
            for name, value in here.items()
            if name not in recorded or recorded[name] != value
        ]
        if not changed:
            return {}, None
        event = SecurityEvent(
            kind="shared_settings_adopted",
            detail={
                **{d.variable: f"{shown(d.recorded)} -> {shown(d.here)}" for d in changed},
                "actor": actor,
            },
        )
        return {d.name: d.here for d in changed}, event

    await store.update_shared_settings(decide, now=to_datetime(clock.now()))
    if changed:
        log.warning(
            "shared settings adopted by %s: %s; replicas still running with the old values "
            "keep serving and report NOT_SERVING on authsvc.settings until replaced",
            actor,
            "; ".join(f"{d.variable} {shown(d.recorded)} -> {shown(d.here)}" for d in changed),
        )
    return changed


class SharedSettingsWatch:
    """A running replica's look, now and then, at whether its settings are still the
    shared ones (someone may have run `authsvc settings adopt`)."""

    def __init__(
        self,
        store: SharedSettingsStorage,
        settings: Settings,
        *,
        on_change: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._store = store
        self._here = shared_values(settings)
        self._on_change = on_change
        self._found: list[Difference] = []
        self.agreeing = True

    async def check(self) -> bool:
        """Compare with the database; whether we agree. A change is logged once."""
        found = differences(await self._store.shared_settings(), self._here)
        if found != self._found:
            if found:
                log.warning(
                    "this replica's settings are no longer the shared ones: %s. It keeps "
                    "serving, reports NOT_SERVING on authsvc.settings and leaves the janitor's "
                    "work to others: restart it with the shared values",
                    "; ".join(d.describe() for d in found),
                )
            else:
                log.info("this replica's settings are the shared ones again")
            self._found = found
        if self.agreeing != (not found):
            self.agreeing = not found
            await self._on_change(self.agreeing)
        return self.agreeing

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:  # the database may be down: look again later
                log.warning("checking the shared settings failed (%s)", type(exc).__name__)
            await asyncio.sleep(interval)
