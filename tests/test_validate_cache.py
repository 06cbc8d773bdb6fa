"""The verified-token cache and the in-memory revocation state never say 'valid' wrongly."""

from __future__ import annotations

from authsvc_client.gen.auth.v1 import auth_pb2
from authsvc_client.token_check import VerifiedTokenCache

from service.domain.access_tokens import AccessClaims, token_lifetime
from service.domain.revocation import (
    REVOCATION_MARGIN_SECONDS,
    Revocation,
    RevocationState,
    forgettable_before,
    remembered_until,
)
from service.settings import MAX_LEEWAY
from service.store.notifications import parse_log_position
from tests.live_server import LiveServer, ServerFactory


async def _validate(server: LiveServer, token: str, **fields: object) -> auth_pb2.ValidateResponse:
    request = auth_pb2.ValidateRequest(access_token=token, **fields)  # type: ignore[arg-type]
    return await server.stub.Validate(request)


async def test_cached_token_still_fails_once_revoked(server: LiveServer) -> None:
    await server.create_user("judy", scopes=("read",))
    pair = await server.login("judy")
    cache = server.running.components.token_cache
    assert (await _validate(server, pair.access_token)).valid
    hits = cache.hits
    assert (await _validate(server, pair.access_token)).valid
    assert cache.hits == hits + 1, "second Validate should be a cache hit"

    await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token))
    verdict = await _validate(server, pair.access_token)
    assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
    assert cache.hits == hits + 2, "the revoked answer came from the cached path"


async def test_cached_token_expires_on_time(server_factory: ServerFactory) -> None:
    server = await server_factory(access_ttl=60, leeway=2)
    await server.create_user("ken")
    pair = await server.login("ken")
    assert (await _validate(server, pair.access_token)).valid
    server.clock.advance(61)
    assert (await _validate(server, pair.access_token)).valid  # within the leeway
    server.clock.advance(1)
    verdict = await _validate(server, pair.access_token)
    assert verdict.error == auth_pb2.VALIDATION_ERROR_EXPIRED
    assert server.running.components.token_cache.hits >= 2


async def test_cached_token_still_checks_audience_and_scope(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(audiences=frozenset({"billing"}))
    await server.create_user("leo", scopes=("read",))
    pair = await server.login("leo", audience="billing")
    assert (await _validate(server, pair.access_token)).valid
    wrong = await _validate(server, pair.access_token, audience="shipping")
    assert wrong.error == auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE
    scoped = await _validate(server, pair.access_token, required_scopes=["write"])
    assert scoped.error == auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE


def _claims(n: int) -> AccessClaims:
    return AccessClaims(
        subject="s",
        session_id=f"sid-{n}",
        token_id=str(n),
        scopes=(),
        audiences=("a",),
        issued_at=0.0,
        expires_at=100.0,
        not_before=None,
    )


def test_cache_is_bounded_and_evicts_the_least_recently_used_first() -> None:
    cache = VerifiedTokenCache[AccessClaims](max_entries=3)
    keys = [cache.key(f"token-{n}") for n in range(5)]
    for n, key in enumerate(keys[:3]):
        cache.put(key, _claims(n))
    assert cache.get(keys[0]) == _claims(0)  # used: token-1 is now the least recent
    cache.put(keys[3], _claims(3))
    cache.put(keys[4], _claims(4))
    assert len(cache) == 3
    assert cache.get(keys[1]) is None
    assert cache.get(keys[2]) is None
    assert cache.get(keys[0]) == _claims(0)
    assert cache.get(keys[4]) == _claims(4)


def test_cache_of_size_zero_stores_nothing() -> None:
    cache = VerifiedTokenCache[AccessClaims](max_entries=0)
    cache.put(cache.key("t"), _claims(1))
    assert cache.get(cache.key("t")) is None


def test_revocation_state_keeps_sessions_until_their_tokens_expired() -> None:
    state = RevocationState()
    # s1's last access token expired at 1900, s2's at 5000 (revoked at the same moment).
    state.add([Revocation("s1", 1000.0, 1900.0), Revocation("s2", 1000.0, 5000.0)])
    assert state.is_revoked("s1") and state.is_revoked("s2")
    # Kept past the bound by the largest leeway allowed and the margin, not by any setting.
    assert state.prune(1900.0 + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS - 0.001) == 0
    assert state.prune(1900.0 + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS) == 1
    assert not state.is_revoked("s1")
    assert state.is_revoked("s2")
    assert len(state) == 1


def test_revocation_state_add_keeps_the_later_bound() -> None:
    state = RevocationState()
    state.add([Revocation("s", 1000.0, 1900.0)])
    state.add([Revocation("s", 1000.0, 1060.0)])  # an older record of the same session
    state.prune(1060.0 + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS + 1)
    assert state.is_revoked("s")


def test_the_bound_arithmetic() -> None:
    """A token issued at t for ttl seconds has exp = int(t) + ttl; its revocation is
    remembered (and the janitor keeps its session) until exp + MAX_LEEWAY + the margin;
    the two views agree at the edge; none of it depends on the current settings."""
    assert token_lifetime(1000.9, 900) == (1000, 1900)
    horizon = remembered_until(1900.0)
    assert horizon == 1900.0 + 300 + 60
    # No validator whose leeway is allowed accepts the token at the horizon.
    assert horizon > 1900.0 + MAX_LEEWAY
    # The janitor's cutoff at `now` keeps exactly the bounds whose horizon is not past.
    assert forgettable_before(horizon) == 1900.0
    assert forgettable_before(horizon - 1) < 1900.0


def test_revocation_log_notifications_carry_only_a_position() -> None:
    assert parse_log_position("42") == 42
    # Anything else (the data-carrying payloads of earlier versions included) is ignored.
    for bad in ("", "-1", "4.2", '[["s", 1000.0, 2000.0]]', "9" * 20, "٣", None, b"1"):
        assert parse_log_position(bad) is None
