"""The verified-token cache and the in-memory revocation state never say 'valid' wrongly."""

from __future__ import annotations

from service.domain.access_tokens import AccessClaims
from service.domain.revocation import RevocationState, VerifiedTokenCache
from service.gen.auth.v1 import auth_pb2
from tests.conftest import LiveServer, ServerFactory


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


def test_cache_is_bounded_and_evicts_oldest_first() -> None:
    cache = VerifiedTokenCache(max_entries=3)
    keys = [cache.key(f"token-{n}") for n in range(5)]
    for n, key in enumerate(keys):
        cache.put(key, _claims(n))
    assert len(cache) == 3
    assert cache.get(keys[0]) is None
    assert cache.get(keys[1]) is None
    assert cache.get(keys[4]) == _claims(4)


def test_cache_of_size_zero_stores_nothing() -> None:
    cache = VerifiedTokenCache(max_entries=0)
    cache.put(cache.key("t"), _claims(1))
    assert cache.get(cache.key("t")) is None


def test_revocation_state_keeps_sessions_until_their_tokens_expired() -> None:
    state = RevocationState(access_ttl=900, leeway=5)
    state.add([("s1", 1000.0), ("s2", 2000.0)])
    assert state.is_revoked("s1") and state.is_revoked("s2")
    # s1's last token expired by 1000 + 900 + 5 (+ margin); s2's has not.
    state.prune(1000.0 + 900 + 5 + 61)
    assert not state.is_revoked("s1")
    assert state.is_revoked("s2")
    assert len(state) == 1


def test_revocation_state_add_keeps_the_later_expiry() -> None:
    state = RevocationState(access_ttl=60, leeway=0)
    state.add([("s", 1000.0)])
    state.add([("s", 500.0)])  # an older record of the same revocation (a resync)
    state.prune(1000.0 + 60 + 59)
    assert state.is_revoked("s")
