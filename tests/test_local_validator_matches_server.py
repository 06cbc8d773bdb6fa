"""LocalValidator.validate against the real server's Validate (issue 10, item 3): for the
same token, scopes and audience, the answer computed in the caller's process must be the
server's answer, field for field (valid, error, subject, session_id, scopes, expires_at,
token_id), and a request the server refuses must be refused with the same fields.

The validator follows a live server's WatchRevocations on the server's ManualClock (its
issuer and leeway). Tokens are the server's own, and tokens signed with the server's own
private key after editing their claims or header (so the checks after the signature are
reached), plus forgeries: tampered parts, algorithm confusion, unknown keys, high-s ECDSA.
Every kind of revocation, a key rotation and a retirement are compared once the validator
has reached the log's head. The spelling, signature and claims checks are one code
(token_check.verified_claims and lifetime_problem, which the server's codec calls); the
keys (a JWK Set against the key ring), the revocations, the caches and the order of the
checks are each side's own: any disagreement is a bug in one of them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from authsvc_client.client import AuthClient, AuthServiceError, RetryPolicy, Validation
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2
from authsvc_client.local_validator import LocalValidator
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from service.domain.keys import SigningKey
from tests.live_server import LiveServer, ServerFactory

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
LIVENESS = 5.0
"""Seconds within which the validator reaches the log's head (a liveness bound)."""


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def with_s(signature: bytes, high: bool) -> bytes:
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    low = s if s <= P256_ORDER // 2 else P256_ORDER - s
    return r.to_bytes(32, "big") + (P256_ORDER - low if high else low).to_bytes(32, "big")


def sign_as_server(
    key: SigningKey,
    claims: dict[str, Any] | bytes,
    *,
    header: dict[str, Any] | bytes | None = None,
    high_s: bool = False,
) -> str:
    """A token signed with the server's private key, with any claims and header."""
    if header is None:
        header_b64 = key.jws_header_b64
    else:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        header_b64 = b64(raw)
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{header_b64}.{b64(payload)}"
    signature = get_default_algorithms()[key.alg].sign(signing_input.encode(), key.private_key)
    if key.alg == "ES256":
        signature = with_s(signature, high_s)
    return f"{signing_input}.{b64(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return decoded


def respell(segment: str) -> str:
    """The segment with its first character changed (still base64url)."""
    return ("B" if segment[0] == "A" else "A") + segment[1:]


@dataclass
class Harness:
    """A live server, a LocalValidator following it, and a client for its Validate."""

    server: LiveServer
    validator: LocalValidator
    client: AuthClient
    compared: int = 0

    @property
    def key(self) -> SigningKey:
        return self.server.running.components.signing_keys.ring.signing_key(self.server.clock.now())

    async def agree(
        self, token: str, scopes: Sequence[str] = (), audience: str = "", what: str = ""
    ) -> Validation:
        """The validator's answer, asserted equal to the server's."""
        remote = await self.client.validate(token, required_scopes=scopes, audience=audience)
        local = self.validator.validate(token, scopes, audience)
        self.compared += 1
        assert local == remote, f"{what}: local {local} != server {remote} for {token!r}"
        return remote

    async def agree_refused(
        self, token: str, scopes: Sequence[str] = (), audience: str = ""
    ) -> tuple[str, ...]:
        """A request over Validate's limits: both refuse it, naming the same fields."""
        with pytest.raises(AuthServiceError) as remote:
            await self.client.validate(token, required_scopes=scopes, audience=audience)
        with pytest.raises(AuthServiceError) as local:
            self.validator.validate(token, scopes, audience)
        assert remote.value.code == local.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert remote.value.reason == local.value.reason
        assert remote.value.fields == local.value.fields
        return remote.value.fields

    async def caught_up(self) -> None:
        """Wait until the server's state and the validator are at the log's head."""
        head = await self.server.pool.fetchval("SELECT sequence FROM revocation_log_head")
        state = self.server.running.components.revocations
        deadline = time.monotonic() + LIVENESS
        while self.validator.sequence < head or state.sequence < head:
            assert time.monotonic() < deadline, (head, state.sequence, self.validator.sequence)
            await asyncio.sleep(0.01)


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(server_factory: ServerFactory) -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(**overrides: object) -> Harness:
        server = await server_factory(**overrides)
        settings = server.settings
        validator = LocalValidator(
            server.address,
            clock=server.clock.now,
            issuer=settings.issuer,
            leeway=settings.leeway,
        )
        harness = Harness(
            server, validator, AuthClient(target=server.address, retry=RetryPolicy(1))
        )
        made.append(harness)
        await validator.start()
        return harness

    yield make
    for harness in made:
        await harness.validator.close()
        await harness.client.close()


async def test_crafted_tokens_get_the_servers_answer(make_harness: HarnessFactory) -> None:
    h = await make_harness(audiences=frozenset({"orders"}))
    server = h.server
    await server.create_user("ann", scopes=("read", "write"))
    pair = await server.login("ann")
    token = pair.access_token
    key = h.key
    now = int(server.clock.now())
    base = claims_of(token)

    # The real token: scopes met and unmet, audiences given, absent and wrong.
    assert (await h.agree(token)).valid
    for scopes in ((), ("read",), ("read", "write"), ("admin",), ("read", "admin")):
        for audience in ("", "authsvc", "orders", "nobody"):
            await h.agree(token, scopes, audience, f"scopes {scopes} audience {audience!r}")
    for_orders = await server.login("ann", audience="orders", scopes=("read",))
    for audience in ("", "authsvc", "orders"):
        await h.agree(for_orders.access_token, ("read",), audience, "issued for orders")
        await h.agree(for_orders.access_token, ("write",), audience, "scope not granted")
    await h.agree(pair.refresh_token, what="a refresh token")

    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(unb64(header_b64))
    forged: dict[str, str] = {
        # tampered parts and encodings
        "payload respelled": f"{header_b64}.{respell(payload_b64)}.{signature_b64}",
        "header respelled": f"{respell(header_b64)}.{payload_b64}.{signature_b64}",
        "signature respelled": f"{header_b64}.{payload_b64}.{respell(signature_b64)}",
        "signature truncated": f"{header_b64}.{payload_b64}.{signature_b64[:-4]}",
        "signature empty": f"{header_b64}.{payload_b64}.",
        "signature padded": f"{header_b64}.{payload_b64}.{signature_b64}==",
        "spare bits set": f"{header_b64}.{payload_b64}.{signature_b64[:-1]}"
        + ("B" if signature_b64[-1] == "A" else chr(ord(signature_b64[-1]) | 1)),
        "two parts": f"{header_b64}.{payload_b64}",
        "four parts": f"{token}.{signature_b64}",
        "payload not base64": f"{header_b64}.{payload_b64}*.{signature_b64}",
        "payload with a non-ASCII letter": f"{header_b64}.{payload_b64}é.{signature_b64}",
        "payload of another token": f"{header_b64}.{for_orders.access_token.split('.')[1]}."
        f"{signature_b64}",
        "not a JWT": "not-a-jwt",
        "dots": "..",
        # the same claims, other headers (signed with the server's key)
        "typ JWT": sign_as_server(key, base, header={**header, "typ": "JWT"}),
        "typ missing": sign_as_server(key, base, header={"alg": key.alg, "kid": key.kid}),
        "typ upper case": sign_as_server(key, base, header={**header, "typ": "AT+JWT"}),
        "typ long form": sign_as_server(key, base, header={**header, "typ": "application/at+jwt"}),
        "typ a number": sign_as_server(key, base, header={**header, "typ": 1}),
        "kid unknown, plausible": sign_as_server(key, base, header={**header, "kid": "k" * 16}),
        "kid unknown, implausible": sign_as_server(key, base, header={**header, "kid": "k"}),
        "kid missing": sign_as_server(key, base, header={"alg": key.alg, "typ": "at+jwt"}),
        "kid a number": sign_as_server(key, base, header={**header, "kid": 7}),
        "alg of another key type": sign_as_server(key, base, header={**header, "alg": "RS256"}),
        "header not an object": sign_as_server(key, base, header=b"[1]"),
        "header not JSON": sign_as_server(key, base, header=b"{"),
        "payload not an object": sign_as_server(key, b'["sub"]'),
        "payload not UTF-8": sign_as_server(key, b'{"sub":"\xff"}'),
        "high s": sign_as_server(key, base, high_s=True)
        if key.alg == "ES256"
        else sign_as_server(key, base),
        "low s (the server's spelling)": sign_as_server(key, base),
    }
    for name in ("jwk", "jku", "x5u", "x5c", "crit"):
        forged[f"header {name}"] = sign_as_server(key, base, header={**header, name: "x"})
    # Algorithm confusion: HS256 keyed with the public key (PEM, DER, JWK), and "none".
    public = key.public_key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret_name, secret in (
        ("PEM", pem),
        ("DER", der),
        ("JWK", json.dumps(key.public_jwk).encode()),
    ):
        hs_header = b64(json.dumps({"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}).encode())
        signing_input = f"{hs_header}.{payload_b64}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        forged[f"HS256 keyed with the {secret_name} public key"] = f"{signing_input}.{b64(mac)}"
    for alg in ("none", "None", "NONE"):
        none_header = b64(json.dumps({"alg": alg, "kid": key.kid, "typ": "at+jwt"}).encode())
        forged[f"alg {alg}"] = f"{none_header}.{payload_b64}."
    # Claims edited and signed with the server's key: each check after the signature.
    edits: dict[str, dict[str, Any]] = {
        "wrong issuer": {"iss": "someone-else"},
        "issuer empty": {"iss": ""},
        "issuer a list": {"iss": [base["iss"]]},
        "expired at now": {"exp": now},
        "expires in a second": {"exp": now + 1},
        "expired a second ago": {"exp": now - 1},
        "exp fractional": {"exp": now + 0.5},
        "exp a string": {"exp": str(now + 60)},
        "exp true": {"exp": True},
        "iat 5 s ahead": {"iat": now + 5},
        "iat 6 s ahead": {"iat": now + 6},
        "nbf 5 s ahead": {"nbf": now + 5},
        "nbf 6 s ahead": {"nbf": now + 6},
        "nbf past": {"nbf": now - 100},
        "nbf null": {"nbf": None},
        "iat fractional": {"iat": now + 5.5},
        "aud a list with ours": {"aud": ["x", "authsvc"]},
        "aud a list without ours": {"aud": ["x", "y"]},
        "aud empty list": {"aud": []},
        "aud empty": {"aud": ""},
        "aud a number": {"aud": 1},
        "aud list with a number": {"aud": ["authsvc", 1]},
        "scope a list": {"scope": ["read"]},
        "scope empty": {"scope": ""},
        "scope with extra spaces": {"scope": "  read   write "},
        "ugen negative": {"ugen": -1},
        "ugen too large": {"ugen": 2**63},
        "ugen largest": {"ugen": 2**63 - 1},
        "ugen a bool": {"ugen": True},
        "ugen a float": {"ugen": 1.0},
        "sub a number": {"sub": 1},
        "sid empty": {"sid": ""},
        "sid of another session": {"sid": for_orders.session_id},
        "jti null": {"jti": None},
    }
    for name, edit in edits.items():
        forged[name] = sign_as_server(key, {**base, **edit})
    for claim in ("iss", "sub", "aud", "exp", "iat", "jti", "sid", "scope", "ugen"):
        forged[f"{claim} missing"] = sign_as_server(
            key, {k: v for k, v in base.items() if k != claim}
        )
    for name, forgery in forged.items():
        for scopes, audience in (((), ""), (("read",), "authsvc"), (("write",), "orders")):
            await h.agree(forgery, scopes, audience, name)

    # Requests over Validate's limits: both refuse them, naming the same fields.
    assert await h.agree_refused("") == ("access_token",)
    assert await h.agree_refused("x" * 8193) == ("access_token",)
    assert await h.agree_refused(token, audience="a" * 257) == ("audience",)
    assert await h.agree_refused(token, audience="a\x00") == ("audience",)
    assert await h.agree_refused(token, scopes=("read",) * 33) == ("required_scopes",)
    assert await h.agree_refused(token, scopes=("ok", "has space")) == ("required_scopes[1]",)
    assert await h.agree_refused("t\x00", scopes=('q"',)) == (
        "access_token",
        "required_scopes[0]",
    )
    assert h.compared > 250


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_every_signing_algorithm_gets_the_servers_answer(
    make_harness: HarnessFactory, alg: str
) -> None:
    h = await make_harness(signing_alg=alg)
    key = h.key
    assert key.alg == alg
    await h.server.create_user("bea", scopes=("read",))
    token = (await h.server.login("bea")).access_token
    assert (await h.agree(token, ("read",), "authsvc")).valid
    header_b64, payload_b64, signature_b64 = token.split(".")
    base = claims_of(token)
    for name, forgery in {
        "signature respelled": f"{header_b64}.{payload_b64}.{respell(signature_b64)}",
        "payload respelled": f"{header_b64}.{respell(payload_b64)}.{signature_b64}",
        "edited and re-signed": sign_as_server(key, {**base, "scope": "read admin"}),
        "expired, re-signed": sign_as_server(key, {**base, "exp": base["iat"]}),
        "another alg named": sign_as_server(
            key,
            base,
            header={"alg": "ES256" if alg != "ES256" else "EdDSA", "kid": key.kid, "typ": "at+jwt"},
        ),
    }.items():
        await h.agree(forgery, ("read",), "authsvc", f"{alg}: {name}")
    edited = await h.agree(sign_as_server(key, {**base, "scope": "read admin"}), ("admin",))
    assert edited.valid  # signed with the server's own key: both take it


@pytest.mark.parametrize("leeway", [0, 30])
async def test_lifetime_edges_get_the_servers_answer(
    make_harness: HarnessFactory, leeway: int
) -> None:
    h = await make_harness(leeway=leeway)
    clock = h.server.clock
    await h.server.create_user("cal")
    token = (await h.server.login("cal")).access_token
    claims = claims_of(token)
    key = h.key
    now = clock.now()
    start_leeway = max(leeway, 5)
    not_yet = {
        f"iat +{d}": sign_as_server(key, {**claims, "iat": int(now) + d})
        for d in (start_leeway, start_leeway + 1)
    } | {
        f"nbf +{d}": sign_as_server(key, {**claims, "nbf": int(now) + d})
        for d in (start_leeway, start_leeway + 1)
    }
    for name, forgery in not_yet.items():
        assert (await h.agree(forgery, what=name)).error in (None, "NOT_YET_VALID")
    # Walk the clock over the token's end: just before, at, and past exp + leeway.
    answers = []
    for at in (-1.0, -0.001, 0.0, 0.5):
        clock.advance(claims["exp"] + leeway + at - clock.now())
        answers.append((await h.agree(token, what=f"exp + leeway {at:+}")).error)
    assert answers == [None, None, "EXPIRED", "EXPIRED"]


async def test_every_kind_of_revocation_gets_the_servers_answer(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(refresh_reuse_grace=0)
    server = h.server
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    tokens: dict[str, str] = {}

    async def user_with_sessions(name: str, sessions: int = 2) -> tuple[str, list[Any]]:
        user = await server.create_user(name)
        pairs = [await server.login(name) for _ in range(sessions)]
        for i, pair in enumerate(pairs):
            tokens[f"{name} #{i}"] = pair.access_token
        return str(user.id), pairs

    async def all_agree(after: str) -> dict[str, str | None]:
        await h.caught_up()
        return {
            name: (await h.agree(t, what=f"after {after}: {name}")).error
            for name, t in tokens.items()
        }

    _, by_token = await user_with_sessions("by-token")
    _, by_refresh = await user_with_sessions("by-refresh")
    subject, everywhere = await user_with_sessions("everywhere")
    await user_with_sessions("password")
    await user_with_sessions("disabled")
    _, reused = await user_with_sessions("reused")
    _, by_admin = await user_with_sessions("by-admin")
    assert set((await all_agree("nothing")).values()) == {None}

    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=by_token[0].access_token))
    assert (await all_agree("Revoke by access token"))["by-token #0"] == "REVOKED"
    await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=by_refresh[1].refresh_token))
    assert (await all_agree("Revoke by refresh token"))["by-refresh #1"] == "REVOKED"
    await server.stub.Revoke(
        auth_pb2.RevokeRequest(subject=subject), metadata=bearer(everywhere[0].access_token)
    )
    answers = await all_agree("Revoke by subject")
    assert answers["everywhere #0"] == answers["everywhere #1"] == "REVOKED"
    await admin.SetPassword(
        admin_pb2.SetPasswordRequest(
            user=admin_pb2.UserSelector(username="password"), password="another password 1"
        )
    )
    answers = await all_agree("SetPassword")
    assert answers["password #0"] == answers["password #1"] == "REVOKED"
    await admin.DisableUser(
        admin_pb2.DisableUserRequest(user=admin_pb2.UserSelector(username="disabled"))
    )
    answers = await all_agree("DisableUser")
    assert answers["disabled #0"] == answers["disabled #1"] == "REVOKED"
    rotated = await server.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=reused[0].refresh_token)
    )
    tokens["reused #0 rotated"] = rotated.tokens.access_token
    assert (await all_agree("a refresh"))["reused #0 rotated"] is None
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=reused[0].refresh_token))
    answers = await all_agree("reuse detection")
    assert answers["reused #0"] == answers["reused #0 rotated"] == "REVOKED"
    assert answers["reused #1"] is None
    await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=by_admin[1].session_id))
    answers = await all_agree("admin RevokeSession")
    assert answers["by-admin #1"] == "REVOKED"
    # A new login of a user revoked everywhere is of the new generation: valid on both.
    tokens["everywhere, again"] = (await server.login("everywhere")).access_token
    answers = await all_agree("a login after Revoke by subject")
    assert answers["everywhere, again"] is None
    assert sorted(n for n, e in answers.items() if e is None) == [
        "by-admin #0",
        "by-refresh #0",
        "by-token #1",
        "everywhere, again",
        "reused #1",
    ]


async def test_key_rotation_and_retirement_get_the_servers_answer(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness()
    server = h.server
    clock = server.clock
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    await server.create_user("dan")
    old = (await server.login("dan")).access_token
    old_key = h.key
    await admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest())
    await h.caught_up()
    assert (await h.agree(old, what="the old key, new one pending")).valid
    clock.advance(1)  # past the new key's activation
    new = (await server.login("dan")).access_token
    assert json.loads(unb64(new.split(".")[0]))["kid"] != old_key.kid
    await h.caught_up()
    assert (await h.agree(new, what="the new key")).valid
    assert (await h.agree(old, what="the old key, superseded")).valid
    # Past every token of the old key: retired, no longer published.
    clock.advance(server.settings.access_ttl + server.settings.leeway + 600)
    retired = await server.running.components.signing_keys.retire_superseded()
    assert retired == [old_key.kid]
    await h.caught_up()
    # `old` itself, which both verified (and cached) before: its key is gone, so
    # BAD_SIGNATURE, not an answer from the verified-token cache (once EXPIRED there).
    assert (await h.agree(old, what="the old token, key retired")).error == "BAD_SIGNATURE"
    # Tokens of the retired key neither has seen before.
    for name, claims in {
        "the old token's claims": claims_of(old),
        "a live exp": {**claims_of(old), "exp": int(clock.now()) + 60},
    }.items():
        forged = sign_as_server(old_key, claims)
        assert (await h.agree(forged, what=f"retired key, {name}")).error == "BAD_SIGNATURE"
    assert (await h.agree(new, what="the new key, expired")).error == "EXPIRED"
    fresh = (await server.login("dan")).access_token
    assert (await h.agree(fresh, what="after the retirement")).valid


# --- generated combinations of claim and header edits -------------------------------

# Each claim's edits (time claims are offsets from the server's clock); "absent" and None
# remove the claim.
_CLAIM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "iss": st.sampled_from(["other", "", None, 1]),
    "sub": st.sampled_from(["", None, 7, "someone"]),
    "sid": st.sampled_from(["", None, "another-session"]),
    "jti": st.sampled_from(["", None, 0]),
    "aud": st.sampled_from(["authsvc", "orders", ["orders", "authsvc"], [], "", 1]),
    "scope": st.sampled_from(["read", "", "read write admin", ["read"], None]),
    "exp": st.sampled_from([-1, 0, 1, 60, "x", None, 0.25]),
    "iat": st.sampled_from([-100, 5, 6, 60, None, "x"]),
    "nbf": st.sampled_from([-100, 5, 6, None, "x", True]),
    "ugen": st.sampled_from([0, 1, -1, 2**63, None, False]),
}
_TIME_CLAIMS = ("exp", "iat", "nbf")


@dataclass(frozen=True)
class Edit:
    claims: tuple[tuple[str, Any], ...]
    typ: str | None
    scopes: tuple[str, ...]
    audience: str

    def token(self, key: SigningKey, base: dict[str, Any], now: int) -> str:
        claims = dict(base)
        for name, value in self.claims:
            if value is None:
                claims.pop(name, None)
            elif (
                name in _TIME_CLAIMS
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                claims[name] = now + value
            else:
                claims[name] = value
        header = {"alg": key.alg, "kid": key.kid}
        if self.typ is not None:
            header["typ"] = self.typ
        return sign_as_server(key, claims, header=header)


edits = st.builds(
    Edit,
    # Up to three claims edited at once (most tokens then fail on one check, not all).
    claims=st.lists(
        st.sampled_from(sorted(_CLAIM_VALUES)).flatmap(
            lambda name: st.tuples(st.just(name), _CLAIM_VALUES[name])
        ),
        max_size=3,
        unique_by=lambda edit: edit[0],
    ).map(tuple),
    typ=st.sampled_from(["at+jwt", "AT+JWT", "application/at+jwt", "JWT", None]),
    scopes=st.sampled_from([(), ("read",), ("write",), ("read", "admin")]),
    audience=st.sampled_from(["", "authsvc", "orders", "nobody"]),
)


def generated_edits(count: int) -> list[Edit]:
    """`count` derandomized examples of `edits` (hypothesis generates; the event loop of
    the async test then checks each one against the live server)."""
    drawn: list[Edit] = []

    @hypothesis_settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(edit=edits)
    def draw(edit: Edit) -> None:
        drawn.append(edit)

    draw()
    return drawn


async def test_generated_claim_edits_get_the_servers_answer(make_harness: HarnessFactory) -> None:
    h = await make_harness(audiences=frozenset({"orders"}))
    await h.server.create_user("eve", scopes=("read", "write"))
    pair = await h.server.login("eve")
    base = claims_of(pair.access_token)
    key = h.key
    now = int(h.server.clock.now())
    examples = generated_edits(300)
    assert len(examples) >= 250
    verdicts: set[str | None] = set()
    for edit in examples:
        answer = await h.agree(edit.token(key, base, now), edit.scopes, edit.audience, repr(edit))
        verdicts.add(answer.error)
    # The examples reached every verdict a token can get here (revocation aside).
    assert verdicts >= {
        None,
        "MALFORMED",
        "EXPIRED",
        "NOT_YET_VALID",
        "WRONG_AUDIENCE",
        "INSUFFICIENT_SCOPE",
    }
