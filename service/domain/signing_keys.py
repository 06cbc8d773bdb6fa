"""Signing-key rotation without downtime, the same on every replica: a key is created
(pending: verifies and is published, signs nothing), active from `activates_at`
(`KEY_ACTIVATION_DELAY` after creation, so its log row reaches every replica first),
superseded when a newer key activates, and retired (private half wiped) once no token it
signed can be alive. Replicas reload when they reach the change's row in the revocation log,
on every reconnect of their listener and on each poll. The states and the caveats for
offline verifiers: docs/operations.md, "Signing-key rotation".
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from service.clock import Clock, to_datetime
from service.domain.keys import KeyRing, SigningKey, generate_signing_key, open_signing_key
from service.domain.ports import SigningKeyStorage
from service.domain.records import SecurityEvent, SigningKeyRecord
from service.domain.revocation import REVOCATION_MARGIN_SECONDS
from service.domain.telemetry import NoTelemetry, Telemetry
from service.secrets_box import SecretBox

log = logging.getLogger(__name__)

KEY_ACTIVATION_DELAY = 0.5
"""Seconds between a key's creation and its first signature (NOTIFY takes milliseconds)."""
UNKNOWN_KID_RELOAD_INTERVAL = 0.25
"""A token naming an unknown key makes this process look for new keys at most this often
(real seconds; a look is one small query), so that made-up key ids cannot turn into
database load."""
UNKNOWN_KID_WAIT = 1.0
"""The longest a call waits for that look before answering with the keys it has."""


@dataclass(frozen=True, slots=True)
class SigningKeyInfo:
    """A signing key as operators see it (no key material)."""

    kid: str
    alg: str
    created_at: datetime
    activates_at: datetime
    retired_at: datetime | None
    retires_at: datetime | None
    """When it will be retired (set once a newer key has superseded it)."""
    state: str
    """pending (published, not signing yet), active (signing), superseded (verifying
    only) or retired."""


class SigningKeys:
    """Loads, rotates and retires the signing keys: the one owner of this process's key
    ring (`ring`, swapped whole on every change), which the codec reads at each use."""

    def __init__(
        self,
        *,
        store: SigningKeyStorage,
        box: SecretBox | None,
        clock: Clock,
        alg: str,
        access_ttl: int,
        leeway: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._store = store
        # None in an operator's command that only lists or retires keys: it needs no KEK.
        self._box_or_none = box
        self._clock = clock
        self._alg = alg
        # How long tokens signed by a superseded key may still be alive.
        self._alive_for = timedelta(seconds=access_ttl + leeway + REVOCATION_MARGIN_SECONDS)
        self._telemetry = telemetry or NoTelemetry()
        self._opened: dict[str, SigningKey] = {}  # parsed once per process
        self._ring: KeyRing | None = None
        self._reloading = asyncio.Lock()
        self._looked_at = -UNKNOWN_KID_RELOAD_INTERVAL
        self._looking: asyncio.Task[None] | None = None
        # One key change at a time per process: the database lock holds a pooled
        # connection while waiting, and the change inside needs another, so a burst of
        # rotations must not hold every connection waiting for that lock.
        self._changing = asyncio.Lock()

    @property
    def _box(self) -> SecretBox:
        if self._box_or_none is None:
            raise RuntimeError("SigningKeys was built without the KEK")
        return self._box_or_none

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("SigningKeys.load() has not run")
        return self._ring

    async def load(self) -> KeyRing:
        """The ring of stored keys, creating the first key on first start."""
        records = await self._store.signing_keys()
        if not any(r.retired_at is None for r in records):
            async with self._changing, self._store.bootstrap_lock():
                records = await self._store.signing_keys()
                if not any(r.retired_at is None for r in records):
                    records.append(await self._create(reason="first_start", activation_delay=0))
        self._ring = KeyRing(self._open_live(records))
        signing = self._ring.signing_key(self._clock.now())
        if signing.alg != self._alg:
            log.warning(
                "AUTH_SIGNING_ALG is %s but the active signing key (kid=%s) is %s; "
                "it applies to keys created from now on",
                self._alg,
                signing.kid,
                signing.alg,
            )
        return self._ring

    async def reload(self) -> bool:
        """Bring the ring in line with the database; whether anything changed."""
        async with self._reloading:
            versions = await self._store.signing_key_versions()
            live = sorted(kid for kid, retired in versions if not retired)
            if live == sorted(self.ring.kids):
                return False
            records = await self._store.signing_keys()
            live_records = [r for r in records if r.retired_at is None]
            if not live_records:
                # Never empty the ring: a database without keys is an operator's mistake.
                log.error("no unretired signing key in the database; keeping the loaded ones")
                return False
            self._ring = KeyRing(self._open_live(records))
            for kid in set(self._opened) - {r.kid for r in live_records}:
                del self._opened[kid]
            log.info("signing keys reloaded: %s", ", ".join(self.ring.kids))
            return True

    async def look_for(self, kid: str) -> bool:
        """Whether `kid` is loaded, after looking in the database if it was not.

        Callers share one look in flight, and a new look starts at most every
        `UNKNOWN_KID_RELOAD_INTERVAL` (so made-up key ids cannot become database load); a
        caller waits for it at most `UNKNOWN_KID_WAIT` seconds (the database may hang).
        """
        if self.ring.verification_key(kid) is not None:
            return True
        task = self._looking
        if task is None or task.done():
            now = time.monotonic()
            if now - self._looked_at < UNKNOWN_KID_RELOAD_INTERVAL:
                return False
            self._looked_at = now
            task = self._looking = asyncio.get_running_loop().create_task(self._look())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=UNKNOWN_KID_WAIT)
        except TimeoutError:
            return False
        return self.ring.verification_key(kid) is not None

    async def _look(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # the database may be down: answer with what we have
            log.warning("looking for new signing keys failed (%s)", type(exc).__name__)

    async def rotate(
        self, *, reason: str = "manual", actor: str | None = None, peer: str | None = None
    ) -> SigningKeyInfo:
        """Create a key that signs everywhere from `KEY_ACTIVATION_DELAY` on."""
        async with self._changing, self._store.bootstrap_lock():
            record = await self._create(reason=reason, actor=actor, peer=peer)
        await self.reload()
        self._telemetry.signing_key_rotated()
        return self._info(record, successor=None, now=self._clock.now())

    async def rotate_if_due(self, period: int) -> SigningKeyInfo | None:
        """The scheduled rotation: a new key if the newest is `period` seconds old."""
        async with self._changing, self._store.bootstrap_lock():
            records = await self._store.signing_keys()
            newest = max(records, key=lambda r: r.created_at, default=None)
            now = to_datetime(self._clock.now())
            if newest is not None and newest.created_at + timedelta(seconds=period) > now:
                return None
            record = await self._create(reason="scheduled")
        await self.reload()
        self._telemetry.signing_key_rotated()
        return self._info(record, successor=None, now=self._clock.now())

    async def retire_superseded(self) -> list[str]:
        """Retire keys whose every token has expired; the kids retired."""
        now = to_datetime(self._clock.now())
        due = [
            info.kid
            for info in self._infos(await self._store.signing_keys(), self._clock.now())
            if info.state == "superseded" and info.retires_at is not None and info.retires_at <= now
        ]
        if not due:
            return []
        retired = await self._store.retire_signing_keys(
            due, now=now, event=SecurityEvent(kind="signing_keys_retired")
        )
        if retired:
            log.warning("security: signing keys retired: %s", ", ".join(retired))
            if self._ring is not None:  # `authsvc keys retire` loads no ring
                await self.reload()
        return retired

    async def describe(self) -> list[SigningKeyInfo]:
        """Every stored key, newest first."""
        infos = self._infos(await self._store.signing_keys(), self._clock.now())
        return sorted(infos, key=lambda i: (i.activates_at, i.created_at, i.kid), reverse=True)

    async def _create(
        self,
        *,
        reason: str,
        actor: str | None = None,
        peer: str | None = None,
        activation_delay: float | None = None,
    ) -> SigningKeyRecord:
        delay = KEY_ACTIVATION_DELAY if activation_delay is None else activation_delay
        # Off the event loop (a 3072-bit RSA key takes a good part of a second), and the
        # activation time counted from when the key is ready, not from before.
        generated = await asyncio.to_thread(
            generate_signing_key, self._alg, self._box, to_datetime(self._clock.now())
        )
        now = self._clock.now()
        record = replace(
            generated, created_at=to_datetime(now), activates_at=to_datetime(now + delay)
        )
        detail = {"kid": record.kid, "alg": record.alg, "reason": reason}
        if actor is not None:
            detail["actor"] = actor
        await self._store.insert_signing_key(
            record, SecurityEvent(kind="signing_key_created", peer=peer, detail=detail)
        )
        log.warning(
            "security: created signing key kid=%s alg=%s (%s); signs from %s",
            record.kid,
            record.alg,
            reason,
            record.activates_at.isoformat(),
        )
        return record

    def _open_live(self, records: list[SigningKeyRecord]) -> list[SigningKey]:
        keys = []
        for record in records:
            if record.retired_at is not None:
                continue
            key = self._opened.get(record.kid)
            if key is None:
                key = self._opened[record.kid] = open_signing_key(record, self._box)
            keys.append(key)
        return keys

    def _infos(self, records: list[SigningKeyRecord], now: float) -> list[SigningKeyInfo]:
        # The key ring's order (keys.py): activation, then creation, then kid, so that keys
        # activating at the same instant are ranked the same way here and there.
        ordered = sorted(records, key=lambda r: (r.activates_at, r.created_at, r.kid))
        infos = []
        for index, record in enumerate(ordered):
            # The key that took over from this one: the next live key already active.
            successor = next(
                (
                    r
                    for r in ordered[index + 1 :]
                    if r.retired_at is None and r.activates_at.timestamp() <= now
                ),
                None,
            )
            infos.append(self._info(record, successor=successor, now=now))
        return infos

    def _info(
        self, record: SigningKeyRecord, *, successor: SigningKeyRecord | None, now: float
    ) -> SigningKeyInfo:
        if record.retired_at is not None:
            state = "retired"
        elif record.activates_at.timestamp() > now:
            state = "pending"
        elif successor is not None:
            state = "superseded"
        else:
            state = "active"
        return SigningKeyInfo(
            kid=record.kid,
            alg=record.alg,
            created_at=record.created_at,
            activates_at=record.activates_at,
            retired_at=record.retired_at,
            retires_at=(
                None
                if successor is None or record.retired_at is not None
                else successor.activates_at + self._alive_for
            ),
            state=state,
        )
