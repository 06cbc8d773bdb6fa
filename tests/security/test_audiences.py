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
from google.rpc import error_details_pb2

from service.domain.shared_settings import adopt_shared_settings
from service.errors import InvalidArgument
from service.settings import Settings, SettingsError, declaration_of
from tests.helpers import (
    COMMA_LOOK_ALIKES,
    assert_error,
    bad_request_fields,
    refresh,
    refresh_fails,
    status_detail,
    validate,
)
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


# What an audience may be (the outside-in review): one rule for the settings and for Issue.

# Separators and invisible characters (Unicode categories Z* and C*): a name holding one
# looks like another name, or like two.
INVISIBLE = (
    "\u00a0",  # Zs no-break space
    "\u3000",  # Zs ideographic space
    "\u2028",  # Zl line separator
    "\u2029",  # Zp paragraph separator
    "\u200b",  # Cf zero width space
    "\u200d",  # Cf zero width joiner
    "\u202e",  # Cf right-to-left override
    "\ufeff",  # Cf byte order mark
    "\u00ad",  # Cf soft hyphen
    "\x7f",  # Cc delete
    "\ue000",  # Co private use
)


def audience_refusal(variable: str, value: str) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and "\n" not in message, message
    assert len(message) < 300, message
    return message


@pytest.mark.parametrize("comma", COMMA_LOOK_ALIKES, ids=lambda c: f"U+{ord(c):04X}")
def test_a_comma_look_alike_in_an_audience_setting_is_refused_saying_why(comma: str) -> None:
    """`AUTH_AUDIENCES=orders<U+FF0C>billing` (a full-width comma) was ONE audience: a client
    naming `orders` or `billing` was refused, and the operator was not told why."""
    for variable in ("AUTH_AUDIENCES", "AUTH_AUDIENCE"):
        message = audience_refusal(variable, f"orders{comma}billing")
        assert f"U+{ord(comma):04X}" in message and "comma" in message, message
        assert "orders" not in message, message


@pytest.mark.parametrize("character", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_an_invisible_or_separator_character_in_an_audience_is_refused(character: str) -> None:
    for variable in ("AUTH_AUDIENCES", "AUTH_AUDIENCE"):
        message = audience_refusal(variable, f"orders{character}api")
        assert f"U+{ord(character):04X}" in message, message
        assert character not in message, message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        # One audience, not two (and no item of AUTH_AUDIENCES can hold a comma).
        ("orders,billing", "AUTH_AUDIENCES"),
        ("orders billing", "U+0020"),
        # JWT's aud is a StringOrURI: a value with ':' must be a URI.
        ("orders_api:v1", "URI"),  # `_` is no scheme character
        (":orders", "URI"),
        ("1orders://x", "URI"),
        ("https://bad host/", "U+0020"),
        ("https://b\u00fccher.example/", "URI"),
        # What a client sends is compared as is: NFD `é` never matches a client's NFC one.
        ("caf\u0065\u0301", "NFC"),
    ],
)
def test_auth_audience_is_held_to_the_audience_rule(value: str, says: str) -> None:
    """AUTH_AUDIENCE was any printable text: spaces, commas, a non-URI with ':'."""
    message = audience_refusal("AUTH_AUDIENCE", value)
    assert says in message, message


def test_audience_names_in_their_one_spelling_are_accepted() -> None:
    names = (
        "orders-api",
        "https://billing.example/",
        "urn:example:orders",
        "spiffe://prod/ns/orders/sa/api",
        "api.example.com",
        "commandes-\u00e9t\u00e9",  # non-ASCII, NFC, no ':'
        "a" * 256,
    )
    for name in names:
        assert Settings.from_env({"AUTH_AUDIENCE": name}).audience == name
    settings = Settings.from_env({"AUTH_AUDIENCES": ",".join(names)})
    assert settings.audiences == frozenset(names)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        # Characters a URI may hold, in places RFC 3986's structure does not allow them.
        ("http://[::1", "U+005B (LEFT SQUARE BRACKET)"),
        ("https://a[b]c/", "U+005B (LEFT SQUARE BRACKET)"),
        ("https://example.com/a]b", "U+005D (RIGHT SQUARE BRACKET)"),
        ("https://[2001:db8::g]/", "IPv6"),
        ("https://[orders]/", "IPv6"),
        ("https://example.com:abc/", "port"),
        ("https://example.com:80:80/", "port"),
        ("a:b#c#d", "U+0023 (NUMBER SIGN)"),
        ("urn:a[1]", "U+005B (LEFT SQUARE BRACKET)"),
        ("https://api.example.com/%zz", "percent"),
        ("https://api.example.com/%2", "percent"),
        ("https://u@v@example.com/", "U+0040 (COMMERCIAL AT)"),
        # Characters no URI holds, named (the value is ASCII: the old message said ASCII).
        ("https://example.com/<x>", "U+003C (LESS-THAN SIGN)"),
        ('urn:x"y', "U+0022 (QUOTATION MARK)"),
        ("https://example.com/a\\b", "U+005C (REVERSE SOLIDUS)"),
        ("https://b\u00fccher.example/", "U+00FC"),
        ("orders_api:v1", "scheme"),
        ("1orders://x", "scheme"),
        (":orders", "scheme"),
    ],
)
def test_an_audience_with_a_colon_is_held_to_rfc_3986s_structure_saying_what_is_wrong(
    value: str, says: str
) -> None:
    """The URI check looked at characters only: `http://[::1`, `https://a[b]c/` or
    `https://example.com:abc/` were accepted, and a refusal named no character."""
    for variable in ("AUTH_AUDIENCE", "AUTH_AUDIENCES"):
        message = audience_refusal(variable, value)
        assert "URI" in message and says in message, message


def test_realistic_uri_audiences_are_still_accepted() -> None:
    """What the outside-in review saw accepted, and should be."""
    names = (
        "https://api.example.com",
        "https://api.example.com:8443",
        "https://api.example.com:8443/v1/orders",
        "https://api.example.com/v1/orders?tenant=acme&x=1",
        "https://api.example.com/v1#frag",
        "https://api.example.com/v1?q=a/b?c#x/y?z",
        "https://[2001:db8::1]:8443/api",
        "https://[::ffff:192.0.2.1]/",
        "https://[v1.fe80::a+en1]/",
        "https://user@api.example.com:/x",
        "https://192.0.2.1:443/",
        "https://api.example.com/%20",
        "https://api.example.com/a:b@c;d=e!f$g'h(i)j*k+l~m",
        "urn:example:orders",
        "urn:ietf:params:oauth:token-type:jwt",
        "api://orders",
        "spiffe://cluster.local/ns/prod/sa/orders",
        "file:///etc/authsvc",
        "mailto:orders@example.com",
        "x:y:z",
        "orders:",
        "orders:api",
        "a+b.c-d:x",
        "orders.v1-beta_2/api",
        "team/orders",
        "orders_service",
    )
    for name in names:
        assert Settings.from_env({"AUTH_AUDIENCE": name}).audience == name
    assert Settings.from_env({"AUTH_AUDIENCES": ",".join(names)}).audiences == frozenset(names)


def test_the_settings_and_issue_use_one_audience_rule() -> None:
    """The setting cannot accept a name Issue would refuse a client for, nor the
    reverse: both ask `audience_problem`."""
    from service.domain.audiences import audience_problem
    from service.request_limits import RequestCheck

    names = (
        "orders",
        "https://billing.example/",
        "orders,billing",
        "orders\uff0cbilling",
        "orders_api:v1",
        "orders:api",  # scheme `orders`: a URI
        "a b",
        "caf\u0065\u0301",
        "x" * 257,
        "\u200b",
    )
    for name in names:
        problem = audience_problem(name)
        try:
            declaration_of("AUTH_AUDIENCE").parser.parse(name)
        except ValueError:
            refused_by_setting = True
        else:
            refused_by_setting = False
        check = RequestCheck()
        check.audience("audience", name)
        try:
            check.done()
        except InvalidArgument as refused:
            [violation] = refused.violations
            assert violation.description == problem, name
            refused_by_issue = True
        else:
            refused_by_issue = False
        assert refused_by_setting == refused_by_issue == (problem is not None), name


async def test_issue_refuses_an_impossible_audience_saying_why(
    server_factory: ServerFactory,
) -> None:
    """A client naming `orders<U+FF0C>billing` is told what is wrong with the name, not only that
    it is not configured (INVALID_ARGUMENT on the `audience` field, before the password)."""
    server = await server_factory(audiences=frozenset({"orders"}))
    await server.create_user("nina")
    for audience, says in (
        ("orders\uff0cbilling", "U+FF0C"),
        ("orders\u200b", "U+200B"),
        ("orders_api:v1", "URI"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.login("nina", audience=audience)
        assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        detail = status_detail(caught.value, error_details_pb2.BadRequest)
        [violation] = detail.field_violations
        assert violation.field == "audience" and says in violation.description, violation
    assert await server.pool.fetchval("SELECT count(*) FROM login_throttle") == 0
    await server.login("nina", audience="orders")
