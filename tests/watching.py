"""A WatchRevocations client for tests: collects every update a stream sends, in the
background, and folds them into the set a verifier would hold."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.live_server import LiveServer


@dataclass
class Watch:
    """One open stream and what it has received."""

    call: grpc.aio.UnaryStreamCall[auth_pb2.WatchRevocationsRequest, auth_pb2.RevocationUpdate]
    updates: list[auth_pb2.RevocationUpdate] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    """time.monotonic() of each update's arrival."""
    error: grpc.aio.AioRpcError | None = None
    sessions: set[str] = field(default_factory=set)
    users: dict[str, int] = field(default_factory=dict)
    sequence: int = 0
    jwks_json: str = ""
    _task: asyncio.Task[None] | None = None
    _pending: tuple[set[str], dict[str, int]] | None = None

    @classmethod
    def open(
        cls,
        channel: grpc.aio.Channel,
        after_sequence: int = 0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Watch:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        call = stub.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(after_sequence=after_sequence), metadata=metadata
        )
        watch = cls(call)
        watch._task = asyncio.create_task(watch._read())
        return watch

    async def _read(self) -> None:
        try:
            async for update in self.call:
                self.updates.append(update)
                self.arrived.append(time.monotonic())
                self._apply(update)
        except grpc.aio.AioRpcError as error:
            self.error = error

    def _apply(self, update: auth_pb2.RevocationUpdate) -> None:
        """As a verifier would: a snapshot (possibly in parts, all but the last with
        sequence 0) replaces the set once complete; other updates add to it."""
        if update.jwks_json:
            self.jwks_json = update.jwks_json
        if update.snapshot:
            self._pending = (set(), {})
        target = self._pending or (self.sessions, self.users)
        target[0].update(r.session_id for r in update.revoked)
        for user in update.revoked_users:
            target[1][user.subject] = max(target[1].get(user.subject, 0), user.generation)
        if update.sequence:
            if self._pending is not None:
                self.sessions, self.users = self._pending
                self._pending = None
            self.sequence = update.sequence

    async def until(
        self, condition: Callable[[Watch], bool], *, within: float = 2.0, what: str = ""
    ) -> None:
        """Wait (a liveness bound, not a speed claim) until `condition` holds."""
        deadline = time.monotonic() + within
        while not condition(self):
            if self.error is not None:
                raise AssertionError(f"stream ended: {self.error.code()} {self.error.details()}")
            assert time.monotonic() < deadline, f"not within {within}s: {what}"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def ended(self, within: float = 5.0) -> grpc.aio.AioRpcError:
        """The status the stream ended with (it must end within `within`)."""
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout=within)
        assert self.error is not None, "the stream ended without an error status"
        return self.error


async def log_revoked_sessions(server: LiveServer, count: int) -> None:
    """`count` revoked sessions appended to the log in one transaction (as a burst of
    revocations would), each remembered for an hour."""
    await server.pool.execute(
        """INSERT INTO revocation_log (kind, session_id, revoked_at, keep_until)
           SELECT 'session', gen_random_uuid(), to_timestamp($1),
                  to_timestamp($1) + interval '1 hour'
             FROM generate_series(1, $2)""",
        server.clock.now(),
        count,
    )


async def wait_until(condition: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)
