"""LocalValidator and the interceptor's default guard on real servers: a snapshot too large
for one update (more than 10,000 revocations: authsvc sends it in parts) is held whole and
exactly as the database holds it; a protected service refuses a token within a second of
its session's revocation on another server of the same database, without asking Validate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
from authsvc_client.client import RetryPolicy
from authsvc_client.gen.auth.v1 import auth_pb2
from authsvc_client.interceptor import RequireAccessToken, current_principal
from authsvc_client.local_validator import LocalValidator
from google.protobuf.wrappers_pb2 import StringValue

from service.api.revocation_watch import MAX_UPDATE_ENTRIES
from service.domain.revocation import Revocation
from service.store.revocations import log_revoked
from tests.helpers import CountingAuthClient
from tests.live_server import LiveServer, ServerFactory

LOGGED = MAX_UPDATE_ENTRIES + 2_345
"""Revoked sessions put in the log: a snapshot of two updates at least."""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def log_head(server: LiveServer) -> int:
    head: int = await server.pool.fetchval("SELECT sequence FROM revocation_log_head")
    return head


async def until_server_applied(server: LiveServer, head: int, within: float = 10.0) -> None:
    state = server.running.components.revocations
    deadline = time.monotonic() + within
    while state.sequence < head:
        assert time.monotonic() < deadline, f"the server did not reach {head} within {within} s"
        await asyncio.sleep(0.02)


async def revoke_until_refused(
    server: LiveServer, validator: LocalValidator, access_token: str, within: float = 5.0
) -> None:
    """Revoke `access_token`'s session on `server`; wait until `validator` refuses it."""
    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=access_token))
    deadline = time.monotonic() + within
    while validator.validate(access_token).valid:
        assert time.monotonic() < deadline, "the revocation did not reach the validator"
        await asyncio.sleep(0.01)


async def test_a_snapshot_of_more_than_10000_revocations_is_held_whole_and_exact(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    now = server.clock.now()
    await server.create_user("ida")
    revoked = await server.login("ida")
    kept = await server.login("ida")
    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=revoked.access_token))
    everywhere = await server.create_user("joe")
    joes = await server.login("joe")
    await server.stub.Revoke(
        auth_pb2.RevokeRequest(subject=str(everywhere.id)), metadata=bearer(joes.access_token)
    )
    # A burst of revocations, appended to the log as the store appends them.
    burst = [Revocation(str(uuid.uuid4()), now, now + 900) for _ in range(LOGGED)]
    async with server.pool.acquire() as conn, conn.transaction():
        await log_revoked(conn, burst)
    head = await log_head(server)
    await until_server_applied(server, head)
    # What the database remembers: every session and user entry still within its bound.
    rows = await server.pool.fetch(
        """SELECT kind, coalesce(session_id, user_id)::text AS id FROM revocation_log
            WHERE keep_until > to_timestamp($1)""",
        now,
    )
    sessions = {r["id"] for r in rows if r["kind"] == "session"}
    users = {r["id"] for r in rows if r["kind"] == "user"}
    assert len(sessions) == LOGGED + 1
    assert users == {str(everywhere.id)}

    validator = LocalValidator(server.address, clock=server.clock.now)
    try:
        await validator.start()
        # Nothing awaited since start() returned: it held all of it then.
        assert validator.revoked_sessions == len(sessions)
        assert all(validator.is_session_revoked(sid) for sid in sessions)
        assert validator.revoked_users == len(users)
        assert validator.sequence == head
        assert validator.snapshots_applied == 1
        assert validator.snapshot_parts >= 2  # it did come in parts
        assert validator.validate(revoked.access_token).error == "REVOKED"
        assert validator.validate(joes.access_token).error == "REVOKED"
        assert validator.validate(kept.access_token).valid
        # And it follows on from there: one more revocation arrives as a delta.
        await revoke_until_refused(server, validator, kept.access_token)
        assert validator.revoked_sessions == len(sessions) + 1
        assert validator.snapshots_applied == 1
    finally:
        await validator.close()


async def test_a_guarded_service_refuses_a_token_within_a_second_of_its_revocation_elsewhere(
    server_factory: ServerFactory,
) -> None:
    """The default guard (RequireAccessToken with its own LocalValidator) on server B; the
    session is revoked through server A (same database): the service refuses the token
    within 1 s (a liveness bound), and never asks Validate."""
    server_a = await server_factory()
    server_b = await server_factory()
    auth = CountingAuthClient(target=server_b.address, retry=RetryPolicy(1))
    method = "/example.Guarded/Whoami"
    guard = RequireAccessToken(auth, {method: ("orders:read",)}, clock=server_b.clock.now)
    assert guard.validator is not None

    async def whoami(request: StringValue, context: Any) -> StringValue:
        return StringValue(value=current_principal().subject)

    service = grpc.aio.server(interceptors=[guard])
    service.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "example.Guarded",
                {
                    "Whoami": grpc.unary_unary_rpc_method_handler(
                        whoami,
                        request_deserializer=StringValue.FromString,
                        response_serializer=StringValue.SerializeToString,
                    )
                },
            ),
        )
    )
    port = service.add_insecure_port("127.0.0.1:0")
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(
        method,
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )
    try:
        await guard.validator.start()
        user = await server_a.create_user("kim", scopes=("orders:read",))
        pair = await server_a.login("kim")
        other = await server_a.login("kim")
        answer = await call(StringValue(), metadata=bearer(pair.access_token))
        assert answer.value == str(user.id)

        await server_a.stub.Revoke(auth_pb2.RevokeRequest(access_token=pair.access_token))
        revoked_at = time.monotonic()
        refused: grpc.StatusCode | None = None
        while refused is None:
            try:
                await call(StringValue(), metadata=bearer(pair.access_token))
            except grpc.aio.AioRpcError as error:
                refused = error.code()
                continue
            assert time.monotonic() - revoked_at < 1.0, "still served 1 s after the revocation"
            await asyncio.sleep(0.005)
        assert refused == grpc.StatusCode.UNAUTHENTICATED
        # The other session of the same user is still served.
        answer = await call(StringValue(), metadata=bearer(other.access_token))
        assert answer.value == str(user.id)
        assert auth.validations == 0  # every answer came from the guard's own process
        assert guard.validator.fallbacks == 0
    finally:
        await channel.close()
        await service.stop(None)
        await guard.close()
        await auth.close()


async def test_a_validator_follows_revocations_across_connection_age_goaways(
    server_factory: ServerFactory,
) -> None:
    """A server tells each connection to go after AUTH_STREAM_MAX_AGE and closes it as long
    again later (bounding calls whose request never arrives): a LocalValidator's stream
    ends with STREAM_MAX_AGE, it resumes on a new connection, and revocations made after
    several such cycles still reach it."""
    server = await server_factory(stream_max_age=0.5)
    await server.create_user("rover")
    pairs = [await server.login("rover") for _ in range(4)]
    validator = LocalValidator(server.address, clock=server.clock.now)
    try:
        await validator.start()
        for pair in pairs:
            await asyncio.sleep(1.2)  # past a GOAWAY and a forced close of the first connection
            assert validator.validate(pair.access_token).valid
            await revoke_until_refused(server, validator, pair.access_token)
        assert validator.snapshots_applied == 1  # every stream after the first resumed
    finally:
        await validator.close()
