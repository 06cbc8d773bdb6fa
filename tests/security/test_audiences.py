"""Issue grants only the audiences the operator configured (`AUTH_AUDIENCE`, always, and the
list `AUTH_AUDIENCES`): a client cannot mint a token for any service that trusts authsvc by
naming it. An unknown audience is INVALID_ARGUMENT with a BadRequest naming the field, before
the password is checked; a session whose audience is no longer configured is not refreshed.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.domain.shared_settings import adopt_shared_settings
from service.settings import Settings, SettingsError
from tests.helpers import assert_error, bad_request_fields, refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory


async def issue_fails_on_audience(server: LiveServer, username: str, audience: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login(username, audience=audience)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(caught.value) == ["audience"]


async def test_an_unconfigured_audience_is_refused_at_issue(server: LiveServer) -> None:
    """The issue's case: Issue(audience="payments-admin-api") gave a token that validated for
    that audience."""
    await server.create_user("mallory")
    for audience in ("payments-admin-api", "AUTHSVC", "authsvc ", " authsvc"):
        await issue_fails_on_audience(server, "mallory", audience)
    # Refused before the password is looked at: no session, no failed login counted.
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0
    assert await server.pool.fetchval("SELECT count(*) FROM login_throttle") == 0
    # With a wrong password too: the audience is a request error, not a credential one.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("mallory", password="wrong password", audience="payments-admin-api")
    assert bad_request_fields(caught.value) == ["audience"]


async def test_the_default_audience_is_always_allowed(server_factory: ServerFactory) -> None:
    earlier: LiveServer | None = None
    for audiences in (frozenset(), frozenset({"orders-api"})):
        if earlier is not None:  # replicas share AUTH_AUDIENCES: a change is adopted first
            await _adopt(earlier, audiences)
        server = earlier = await server_factory(audiences=audiences)
        user = await server.create_user()
        for named in ("", server.settings.audience):
            pair = await server.login(user.username, audience=named)
            verdict = await validate(server, pair.access_token, audience="authsvc")
            assert verdict.valid, (audiences, named)


async def test_a_configured_audience_is_issued_and_refreshed(server_factory: ServerFactory) -> None:
    server = await server_factory(audiences=frozenset({"orders-api", "billing-api"}))
    await server.create_user("olga")
    pair = await server.login("olga", audience="orders-api")
    assert (await validate(server, pair.access_token, audience="orders-api")).valid
    verdict = await validate(server, pair.access_token, audience="billing-api")
    assert verdict.error == auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE
    rotated = await refresh(server, pair.refresh_token)
    assert (await validate(server, rotated.access_token, audience="orders-api")).valid
    await issue_fails_on_audience(server, "olga", "payments-admin-api")


async def test_a_session_whose_audience_is_no_longer_configured_is_not_refreshed(
    server_factory: ServerFactory,
) -> None:
    """Removing an audience from AUTH_AUDIENCES stops its sessions from getting new tokens
    (and sessions an older version issued for any audience at all)."""
    before = await server_factory(audiences=frozenset({"legacy-api"}))
    await before.create_user("lena")
    legacy = await before.login("lena", audience="legacy-api")
    default = await before.login("lena")
    # Same database, legacy-api no longer configured (adopted for every replica first).
    await _adopt(before, frozenset())
    after = await server_factory()
    await refresh_fails(after, legacy.refresh_token, "REFRESH_TOKEN_INVALID")
    assert (await refresh(after, default.refresh_token)).session_id == default.session_id
    # Nothing was rotated by the refusal: the old configuration still refreshes it.
    assert (await refresh(before, legacy.refresh_token)).session_id == legacy.session_id


async def _adopt(server: LiveServer, audiences: frozenset[str]) -> None:
    """Record `audiences` as the shared AUTH_AUDIENCES, as `authsvc settings adopt` does."""
    await adopt_shared_settings(
        server.running.components.store,
        replace(server.settings, audiences=audiences),
        clock=server.clock,
        actor="test",
    )


# Settings


def test_auth_audiences_is_a_comma_separated_list() -> None:
    # Bare commas only: blanks around items or the value, empty items and repeats are
    # refused like every setting's loose spelling (one strict spelling per kind).
    settings = Settings.from_env({"AUTH_AUDIENCES": "orders-api,https://billing.example/"})
    assert settings.audiences == frozenset({"orders-api", "https://billing.example/"})
    for loose in (" orders-api", "orders-api, billing", "orders-api,,billing", "orders-api,"):
        with pytest.raises(SettingsError):
            Settings.from_env({"AUTH_AUDIENCES": loose})
    assert Settings.from_env({}).audiences == frozenset()


@pytest.mark.parametrize(
    "raw",
    ["a b", "orders\tapi", "x" * 257, "ok,bad\x00one", "é" * 129],
)
def test_a_bad_auth_audiences_value_stops_start_up(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AUTH_AUDIENCES": raw})
    assert str(caught.value).startswith("AUTH_AUDIENCES: ")
