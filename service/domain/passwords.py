"""Password hashing with argon2id, off the event loop.

Parameters are OWASP's minimum for argon2id (19 MiB, 2 passes, 1 lane): strong
enough, and cheap enough that a login burst does not starve the hot path.
Hashes made with other parameters are upgraded on the next successful login.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ARGON2_MEMORY_KIB = 19_456
ARGON2_TIME_COST = 2
ARGON2_PARALLELISM = 1


def make_argon2_hasher() -> Argon2Hasher:
    """The hasher with the service's parameters (also used by the benchmark baseline)."""
    return Argon2Hasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_KIB,
        parallelism=ARGON2_PARALLELISM,
        hash_len=32,
        salt_len=16,
        type=Type.ID,
    )


def lower_thread_priority() -> None:
    """Run this thread at the lowest CPU priority (Linux: niceness is per thread).

    A login burst then takes only the CPU the event loop leaves over, so Validate,
    whose answer someone is waiting for, keeps its latency.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class PasswordHashing(Protocol):
    """What logins and the user directory need of a password hasher."""

    @property
    def threads(self) -> int:
        """How many hashes run at once."""

    async def hash(self, password: str) -> str: ...

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True if `password` matches; with no hash, spend the same time and say False."""

    def needs_rehash(self, password_hash: str) -> bool: ...


class PasswordHasher:
    """Hashes and verifies passwords in a thread pool (sized to the cores), at low priority.

    argon2-cffi releases the GIL while hashing, so the pool runs hashes truly in
    parallel while the event loop keeps serving other calls.
    """

    def __init__(self, *, threads: int) -> None:
        self._argon2 = make_argon2_hasher()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(
            max_workers=self.threads,
            thread_name_prefix="argon2",
            initializer=lower_thread_priority,
        )
        # Verified against for unknown usernames, so they cost the same as real ones.
        self._dummy_hash = self._argon2.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._argon2.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True if `password` matches; with no hash, spend the same time and say False."""
        loop = asyncio.get_running_loop()
        if password_hash is None:
            await loop.run_in_executor(self._pool, self._verify, self._dummy_hash, password)
            return False
        return await loop.run_in_executor(self._pool, self._verify, password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._argon2.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
