"""A caller token revoked with all of its user's sessions stays revoked for Revoke.

Logging out everywhere, a password change and disabling a user revoke a user's sessions by
raising the user's session generation: each token of an older generation is revoked, as
Validate answers. Revoke by `session_id` or `subject` authenticates its caller by such a
token; it must see the same revocation, or a stolen token the victim thought dead (they
changed their password) could log the victim out of every new session, again and again,
until the token expired.
"""

from __future__ import annotations

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2

from tests.helpers import assert_error, validate
from tests.live_server import LiveServer

Metadata = tuple[tuple[str, str], ...]
REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def assert_refused(
    server: LiveServer, request: auth_pb2.RevokeRequest, caller_token: str
) -> None:
    try:
        await server.stub.Revoke(request, metadata=bearer(caller_token))
    except grpc.aio.AioRpcError as error:
        assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
    else:
        raise AssertionError("Revoke accepted a revoked caller token")


async def test_a_token_revoked_by_logging_out_everywhere_cannot_end_the_new_sessions(
    server: LiveServer,
) -> None:
    alice = await server.create_user("alice")
    stolen = await server.login("alice")
    everywhere = auth_pb2.RevokeRequest(subject=str(alice.id))
    response = await server.stub.Revoke(everywhere, metadata=bearer(stolen.access_token))
    assert response.revoked_sessions == 1
    assert (await validate(server, stolen.access_token)).error == REVOKED

    fresh = await server.login("alice")
    await assert_refused(server, everywhere, stolen.access_token)
    await assert_refused(
        server, auth_pb2.RevokeRequest(session_id=fresh.session_id), stolen.access_token
    )
    assert (await validate(server, fresh.access_token)).valid


async def test_a_token_revoked_by_a_password_change_cannot_end_the_new_sessions(
    server: LiveServer,
) -> None:
    alice = await server.create_user("alice")
    stolen = await server.login("alice")
    users = server.running.components.users
    await users.set_password("alice", "a brand new passphrase 42", revoke_sessions=True)
    assert (await validate(server, stolen.access_token)).error == REVOKED

    fresh = await server.login("alice", password="a brand new passphrase 42")
    await assert_refused(server, auth_pb2.RevokeRequest(subject=str(alice.id)), stolen.access_token)
    await assert_refused(
        server, auth_pb2.RevokeRequest(session_id=fresh.session_id), stolen.access_token
    )
    assert (await validate(server, fresh.access_token)).valid
