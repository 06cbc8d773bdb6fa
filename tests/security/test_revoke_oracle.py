"""Revoke is no oracle for stolen access tokens.

Revoke by `session_id` or `subject` authenticates the caller with `authorization: Bearer
<access token>`. Whoever holds a token must not learn through Revoke whether it is live
(its session not revoked) without ending a live session: every answer that ends nothing is
the same bytes, whatever the token (live, revoked, expired, forged, none) and whatever the
target (unknown, another user's, malformed, already ended). Such refused calls are
recorded as security events (`revoke_refused`), at most a few a second per process.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ec

from service.clock import ManualClock
from tests.helpers import assert_error, validate
from tests.live_server import LiveServer

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def answer(
    server: LiveServer, request: auth_pb2.RevokeRequest, metadata: Metadata
) -> tuple[Any, ...]:
    """Everything a caller sees of a Revoke call: the response, or the status code, the
    message and every trailing metadata byte (google.rpc.Status with its details)."""
    try:
        response = await server.stub.Revoke(request, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        trailers = tuple(
            sorted(
                (k, bytes(v) if isinstance(v, bytes) else v.encode())
                for k, v in error.trailing_metadata() or ()
            )
        )
        return ("error", error.code(), error.details(), trailers)
    return ("ok", response.SerializeToString())


def forged_like(token: str) -> str:
    """The token's own header and claims, signed by another ES256 key."""
    header = pyjwt.get_unverified_header(token)
    claims = json.loads(pyjwt.utils.base64url_decode(token.split(".")[1]))
    return pyjwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256", headers=header)


async def session_states(server: LiveServer) -> dict[uuid.UUID, Any]:
    rows = await server.pool.fetch("SELECT id, revoked_at FROM sessions")
    return {row["id"]: row["revoked_at"] for row in rows}


async def test_revoke_answers_the_same_for_live_revoked_expired_and_forged_caller_tokens(
    server: LiveServer, clock: ManualClock
) -> None:
    """The issue's probe: Revoke(session_id=<random>) or Revoke(subject="x") with a stolen
    token answered PERMISSION_DENIED for a live token and UNAUTHENTICATED for a dead one,
    and ended nothing. Now every probe gets the same answer, and nothing changes."""
    alice = await server.create_user("alice")
    bob = await server.create_user("bob")
    expired = await server.login("alice")
    clock.advance(server.settings.access_ttl + 1)
    live = await server.login("alice")
    revoked = await server.login("alice")
    assert (
        await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=revoked.access_token))
    ).revoked_sessions == 1
    bob_pair = await server.login("bob")
    callers: dict[str, Metadata] = {
        "live": bearer(live.access_token),
        "revoked": bearer(revoked.access_token),
        "expired": bearer(expired.access_token),
        "forged": bearer(forged_like(live.access_token)),
        "garbage": bearer("garbage." + secrets.token_urlsafe(24)),
        "none": (),
    }
    targets = {
        "random session": auth_pb2.RevokeRequest(session_id=str(uuid.uuid4())),
        "malformed session": auth_pb2.RevokeRequest(session_id="not-a-session"),
        "another user's session": auth_pb2.RevokeRequest(session_id=bob_pair.session_id),
        # Alice's own session, but ended already: a live token must not be told apart here
        # either (whoever knows the id of an ended session could test tokens for free).
        "an ended session of the same user": auth_pb2.RevokeRequest(session_id=revoked.session_id),
        "made-up subject": auth_pb2.RevokeRequest(subject="x"),
        "another subject": auth_pb2.RevokeRequest(subject=str(bob.id)),
        "the subject in upper case": auth_pb2.RevokeRequest(subject=str(alice.id).upper()),
    }
    before = await session_states(server)
    for target_name, request in targets.items():
        answers = {
            name: await answer(server, request, metadata) for name, metadata in callers.items()
        }
        assert len(set(answers.values())) == 1, (target_name, answers)
        (seen,) = set(answers.values())
        assert seen[0] == "error", target_name
    assert await session_states(server) == before, "a refused Revoke changed a session"
    assert (await validate(server, live.access_token)).valid
    assert (await validate(server, bob_pair.access_token)).valid

    # The refusal is the documented one.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Revoke(
            auth_pb2.RevokeRequest(session_id=str(uuid.uuid4())), metadata=callers["live"]
        )
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")


async def test_only_ending_a_live_session_tells_a_live_token_apart(server: LiveServer) -> None:
    """What still differs ends a live session: the token's own (the thief loses it), or
    another live one of the same user."""
    await server.create_user("carol")
    first = await server.login("carol")
    second = await server.login("carol")
    assert (
        await server.stub.Revoke(
            auth_pb2.RevokeRequest(session_id=second.session_id),
            metadata=bearer(first.access_token),
        )
    ).revoked_sessions == 1
    assert not (await validate(server, second.access_token)).valid
    # A repeat ends nothing, so it gets the refusal, like any dead token would.
    dead_caller = await answer(
        server, auth_pb2.RevokeRequest(session_id=second.session_id), bearer(second.access_token)
    )
    repeat = await answer(
        server, auth_pb2.RevokeRequest(session_id=second.session_id), bearer(first.access_token)
    )
    assert repeat == dead_caller
    assert repeat[0] == "error"
    assert (await validate(server, first.access_token)).valid


async def test_refused_revokes_are_recorded_as_security_events(server: LiveServer) -> None:
    await server.create_user("dave")
    victim = await server.create_user("erin")
    live = await server.login("dave")
    erin_pair = await server.login("erin")
    forged = forged_like(live.access_token)
    probes = [
        (auth_pb2.RevokeRequest(session_id=erin_pair.session_id), bearer(live.access_token)),
        (auth_pb2.RevokeRequest(subject=str(victim.id)), bearer(forged)),
        (auth_pb2.RevokeRequest(subject="x"), ()),
    ]
    for request, metadata in probes:
        with pytest.raises(grpc.aio.AioRpcError):
            await server.stub.Revoke(request, metadata=metadata)
    rows = await server.pool.fetch(
        "SELECT subject, session_id, peer, detail FROM security_events"
        " WHERE kind = 'revoke_refused' ORDER BY id"
    )
    assert len(rows) == 3
    details = [json.loads(row["detail"]) for row in rows]
    assert [d["target"] for d in details] == ["session_id", "subject", "subject"]
    assert [d["caller_token"] for d in details] == ["live", "invalid", "none"]
    assert all(row["peer"] for row in rows)
    # The live token is named by its session and subject (the stolen token to look for);
    # a forged one names nothing it claims.
    assert str(rows[0]["session_id"]) == live.session_id
    assert rows[0]["subject"] is not None
    assert details[0]["target_session"] == erin_pair.session_id
    assert rows[1]["session_id"] is None and rows[1]["subject"] is None
    assert details[1]["target_subject"] == str(victim.id)


async def test_a_flood_of_probes_records_a_bounded_number_of_events(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Probing is cheap for the client: it must not become a database row and a log line
    each. The test's clock stands still, so all the probes fall in one second."""
    await server.create_user("fran")
    live = await server.login("fran")
    caplog.clear()
    for _ in range(60):
        with pytest.raises(grpc.aio.AioRpcError):
            await server.stub.Revoke(
                auth_pb2.RevokeRequest(session_id=str(uuid.uuid4())),
                metadata=bearer(live.access_token),
            )
    recorded = await server.pool.fetchval(
        "SELECT count(*) FROM security_events WHERE kind = 'revoke_refused'"
    )
    assert 1 <= recorded <= 20
    lines = [r for r in caplog.records if "Revoke" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(lines) <= recorded
    # A second later the budget is back.
    server.clock.advance(1.5)
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.Revoke(
            auth_pb2.RevokeRequest(subject="x"), metadata=bearer(live.access_token)
        )
    assert (
        await server.pool.fetchval(
            "SELECT count(*) FROM security_events WHERE kind = 'revoke_refused'"
        )
        == recorded + 1
    )


async def test_probes_of_ever_new_targets_from_one_address_share_a_row(server: LiveServer) -> None:
    """Rows are grouped by address, caller token and kind of target, not by the target: a
    new random session id or subject in each probe would otherwise be a row each (up to
    the per-second budget, every second, for as long as events are kept)."""
    await server.create_user("gail")
    dead = await server.login("gail")
    await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=dead.refresh_token))
    for _ in range(5):
        for _ in range(30):
            for request in (
                auth_pb2.RevokeRequest(session_id=str(uuid.uuid4())),
                auth_pb2.RevokeRequest(subject=str(uuid.uuid4())),
            ):
                for metadata in ((), bearer(dead.access_token)):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await server.stub.Revoke(request, metadata=metadata)
        server.clock.advance(1.5)  # a fresh per-second budget each round
    rows = await server.pool.fetch(
        "SELECT detail, occurrences FROM security_events WHERE kind = 'revoke_refused'"
    )
    # One row per kind of target and caller token: no token, or the revoked one.
    assert len(rows) == 4
    assert sum(row["occurrences"] for row in rows) >= 4 * 5
