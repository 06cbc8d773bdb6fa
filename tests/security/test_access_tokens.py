"""Access tokens over gRPC: JWKS checked by an independent JOSE library, forgeries, claim checks.

Forged tokens must come back from Validate as OK with valid=false, never as an
RPC error. Claim checks use tokens signed with the service's own key (read from
the test database and unsealed), so the signature verifies and the claim check
under test is what decides.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet
from jwt.algorithms import get_default_algorithms

from service.clock import ManualClock
from service.domain.keys import PrivateKey, SigningKey, open_signing_key
from service.domain.records import SigningKeyRecord
from service.secrets_box import SecretBox
from tests.helpers import assert_error, validate
from tests.live_server import TEST_KEK, LiveServer, ServerFactory

ALGS = ("EdDSA", "ES256", "RS256")
MALFORMED = auth_pb2.VALIDATION_ERROR_MALFORMED
BAD_SIGNATURE = auth_pb2.VALIDATION_ERROR_BAD_SIGNATURE

# Helpers


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64json(value: object) -> str:
    return b64e(json.dumps(value, separators=(",", ":")).encode())


def header_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64d(token.split(".")[0]))
    return value


def claims_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64d(token.split(".")[1]))
    return value


async def assert_rejected(server: LiveServer, token: str, *expected: int) -> None:
    """Validate answers OK with valid=false and (if given) one of the `expected` errors."""
    verdict = await validate(server, token)
    assert not verdict.valid, token
    assert verdict.error != auth_pb2.VALIDATION_ERROR_UNSPECIFIED
    if expected:
        assert verdict.error in expected, (token[:80], verdict.error)
    # Nothing about the token leaks into a negative answer.
    assert verdict.subject == ""
    assert verdict.session_id == ""
    assert list(verdict.scopes) == []


async def service_key(server: LiveServer) -> SigningKey:
    """The service's signing key, read from its database and unsealed with the test KEK."""
    async with server.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM signing_keys ORDER BY created_at")
    assert len(rows) == 1
    row = rows[0]
    record = SigningKeyRecord(
        kid=row["kid"],
        alg=row["alg"],
        public_jwk=json.loads(row["public_jwk"]),
        private_key_sealed=bytes(row["private_key_sealed"]),
        created_at=row["created_at"],
        activates_at=row["activates_at"],
        retired_at=row["retired_at"],
    )
    return open_signing_key(record, SecretBox(TEST_KEK))


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def low_s(token: str) -> str:
    """An ES256 token with the low one of its two valid signatures, the only one the service
    accepts (tests/security/test_token_spellings.py); other tokens unchanged."""
    header_b64, payload_b64, signature_b64 = token.split(".")
    if json.loads(b64d(header_b64)).get("alg") != "ES256":
        return token
    raw = b64d(signature_b64)
    s = int.from_bytes(raw[32:], "big")
    if len(raw) != 64 or s <= P256_ORDER // 2:
        return token
    return f"{header_b64}.{payload_b64}.{b64e(raw[:32] + (P256_ORDER - s).to_bytes(32, 'big'))}"


def sign_segments(key_alg: str, private_key: PrivateKey, header_b64: str, payload_b64: str) -> str:
    """A token whose signature is valid over the literal segments, whatever they hold."""
    signing_input = f"{header_b64}.{payload_b64}".encode()
    signature = get_default_algorithms()[key_alg].sign(signing_input, private_key)
    return low_s(f"{header_b64}.{payload_b64}.{b64e(signature)}")


def fresh_private_key(alg: str) -> PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: SigningKey) -> bytes:
    return key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def hs256_token(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    header_b64, payload_b64 = b64json(header), b64json(claims)
    mac = hmac.new(secret, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    return f"{header_b64}.{payload_b64}.{b64e(mac)}"


async def logged_in(server: LiveServer, scopes: tuple[str, ...] = ("read", "write")) -> Any:
    await server.create_user("alice", scopes=scopes)
    return await server.login("alice")


# 1. JWKS, verified by joserfc (not pyjwt)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("alg", ALGS)
async def test_jwks_verifies_access_tokens_with_an_independent_library(
    server_factory: ServerFactory, alg: str
) -> None:
    server = await server_factory(signing_alg=alg)
    user = await server.create_user("alice", scopes=("read", "write"))
    pair = await server.login("alice")
    second = await server.login("alice", scopes=("read",))
    rotated = (
        await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
    ).tokens

    jwks_json = (await server.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json
    jwks = json.loads(jwks_json)
    assert isinstance(jwks["keys"], list) and jwks["keys"]
    for jwk in jwks["keys"]:
        assert jwk["alg"] == alg
        assert jwk["use"] == "sig"
        assert jwk["kid"]
        # Public halves only.
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    kids = {jwk["kid"] for jwk in jwks["keys"]}
    key_set = KeySet.import_key_set(jwks)

    jtis = set()
    for token, session_id, scopes in (
        (pair.access_token, pair.session_id, "read write"),
        (second.access_token, second.session_id, "read"),
        (rotated.access_token, pair.session_id, "read write"),
    ):
        decoded = jose_jwt.decode(token, key_set, algorithms=[alg])
        assert decoded.header["typ"] == "at+jwt"
        assert decoded.header["alg"] == alg
        assert decoded.header["kid"] in kids
        claims = decoded.claims
        for name in ("iss", "sub", "aud", "exp", "iat", "jti", "sid", "scope"):
            assert name in claims, name
        assert claims["iss"] == server.settings.issuer
        assert claims["sub"] == str(user.id)
        assert claims["aud"] == server.settings.audience
        assert claims["sid"] == session_id
        assert claims["scope"] == scopes
        assert claims["iat"] == int(server.clock.now())
        assert claims["exp"] == claims["iat"] + server.settings.access_ttl
        jtis.add(claims["jti"])
    assert len(jtis) == 3

    # joserfc really checks the signature: a tampered payload fails with it too.
    header_b64, _, signature_b64 = pair.access_token.split(".")
    tampered = f"{header_b64}.{b64json({**claims_of(pair.access_token), 'scope': 'admin'})}"
    with pytest.raises(BadSignatureError):
        jose_jwt.decode(f"{tampered}.{signature_b64}", key_set, algorithms=[alg])


# 2. Forgeries: always OK with valid=false


@pytest.mark.parametrize("alg", ALGS)
async def test_key_confusion_forgeries_are_rejected(
    server_factory: ServerFactory, alg: str
) -> None:
    server = await server_factory(signing_alg=alg)
    pair = await logged_in(server)
    key = await service_key(server)
    assert key.alg == alg
    claims = claims_of(pair.access_token)
    jwk = json.loads((await server.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)["keys"][0]

    # HS256 with our public key as the HMAC secret, in every form an attacker could get.
    secrets_tried = [
        public_pem(key),
        public_pem(key).strip(),
        json.dumps(jwk).encode(),
        json.dumps(jwk, separators=(",", ":")).encode(),
        key.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ]
    if alg == "EdDSA":
        secrets_tried.append(b64d(jwk["x"]))
        secrets_tried.append(jwk["x"].encode())
    for secret in secrets_tried:
        for header in (
            {"alg": "HS256", "typ": "at+jwt", "kid": key.kid},
            {"alg": "HS256", "typ": "at+jwt"},
        ):
            await assert_rejected(
                server, hs256_token(secret, header, claims), MALFORMED, BAD_SIGNATURE
            )

    # A token signed by another, freshly generated key that claims our kid.
    impostor = fresh_private_key(alg)
    forged = pyjwt.encode(
        claims, impostor, algorithm=alg, headers={"kid": key.kid, "typ": "at+jwt"}
    )
    assert header_of(forged)["kid"] == key.kid
    await assert_rejected(server, forged, BAD_SIGNATURE)

    # The genuine token still validates: the rejections above are about the forgeries.
    assert (await validate(server, pair.access_token)).valid


@pytest.mark.parametrize("alg_name", ["none", "None", "nOnE", "NONE"])
async def test_alg_none_is_rejected(server: LiveServer, alg_name: str) -> None:
    pair = await logged_in(server)
    kid = header_of(pair.access_token)["kid"]
    payload = b64json(claims_of(pair.access_token))
    for header in (
        {"alg": alg_name, "typ": "at+jwt", "kid": kid},
        {"alg": alg_name, "typ": "at+jwt"},
        {"alg": alg_name},
    ):
        unsigned = f"{b64json(header)}.{payload}"
        await assert_rejected(server, unsigned + ".")
        await assert_rejected(server, unsigned, MALFORMED)
        # The genuine signature glued onto an alg=none header proves nothing either.
        await assert_rejected(server, f"{unsigned}.{pair.access_token.split('.')[2]}")


async def test_unknown_kid_and_tampered_payload_are_bad_signatures(server: LiveServer) -> None:
    pair = await logged_in(server)
    header_b64, payload_b64, signature_b64 = pair.access_token.split(".")
    header = header_of(pair.access_token)

    unknown_kid = b64json({**header, "kid": "no-such-key"})
    await assert_rejected(server, f"{unknown_kid}.{payload_b64}.{signature_b64}", BAD_SIGNATURE)

    for change in ({"scope": "read write admin"}, {"sub": str(uuid.uuid4())}, {"exp": 2**40}):
        tampered = b64json({**claims_of(pair.access_token), **change})
        await assert_rejected(server, f"{header_b64}.{tampered}.{signature_b64}", BAD_SIGNATURE)

    # A flipped bit in the signature.
    signature = bytearray(b64d(signature_b64))
    signature[0] ^= 1
    flipped = f"{header_b64}.{payload_b64}.{b64e(bytes(signature))}"
    await assert_rejected(server, flipped, BAD_SIGNATURE)

    assert (await validate(server, pair.access_token)).valid


async def test_keys_embedded_in_the_token_are_not_trusted(server: LiveServer) -> None:
    pair = await logged_in(server)
    claims = claims_of(pair.access_token)
    kid = header_of(pair.access_token)["kid"]
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_jwk = pyjwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    for headers in (
        {"typ": "at+jwt", "jwk": attacker_jwk},
        {"typ": "at+jwt", "kid": kid, "jwk": attacker_jwk},
        {"typ": "at+jwt", "jwk": {**attacker_jwk, "kid": "attacker"}, "kid": "attacker"},
        {"typ": "at+jwt", "jku": "https://attacker.example/jwks.json"},
        {"typ": "at+jwt", "kid": kid, "jku": "https://attacker.example/jwks.json"},
        {"typ": "at+jwt", "kid": kid, "x5u": "https://attacker.example/cert.pem"},
        {"typ": "at+jwt", "kid": kid, "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
    ):
        forged = pyjwt.encode(claims, attacker, algorithm="EdDSA", headers=headers)
        await assert_rejected(server, forged, MALFORMED, BAD_SIGNATURE)
    # Even the service's own, validly signed token is refused when it names a key source:
    # such a header marks a forgery attempt, and `crit` extensions are not understood.
    own_headers = header_of(pair.access_token)
    for extra in ({"x5u": "https://attacker.example/c"}, {"crit": ["exp"]}, {"jwk": attacker_jwk}):
        key = await service_key(server)
        signed = sign_segments(
            key.alg, key.private_key, b64json({**own_headers, **extra}), b64json(claims)
        )
        await assert_rejected(server, signed, MALFORMED)


async def test_the_jws_json_serialization_is_refused(server: LiveServer) -> None:
    """Only the compact form is an access token; the JSON forms of RFC 7515 are not."""
    pair = await logged_in(server)
    header, payload, signature = pair.access_token.split(".")
    flattened = json.dumps({"protected": header, "payload": payload, "signature": signature})
    general = json.dumps(
        {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}
    )
    for form in (flattened, general):
        await assert_rejected(server, form, MALFORMED)


async def test_hostile_kid_values_are_rejected(server: LiveServer) -> None:
    pair = await logged_in(server)
    _, payload_b64, signature_b64 = pair.access_token.split(".")
    header = header_of(pair.access_token)
    for kid in (
        1,
        0,
        None,
        True,
        [header["kid"]],
        {"kid": header["kid"]},
        "../../dev/null",
        "k" * 5000,
        header["kid"] + "\x00",
        header["kid"].upper() + "x",
    ):
        token = f"{b64json({**header, 'kid': kid})}.{payload_b64}.{signature_b64}"
        assert len(token.encode()) <= 8 * 1024
        await assert_rejected(server, token, MALFORMED, BAD_SIGNATURE)

    # A 10 kB kid makes the token larger than the documented 8 KiB limit: that one
    # request is refused as INVALID_ARGUMENT, which is the contract for oversized tokens.
    huge = f"{b64json({**header, 'kid': 'k' * 10_000})}.{payload_b64}.{signature_b64}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await validate(server, huge)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_structurally_broken_tokens_are_malformed(server: LiveServer) -> None:
    pair = await logged_in(server)
    token = pair.access_token
    header_b64, payload_b64, signature_b64 = token.split(".")
    cases = [
        f"{token}.{signature_b64}",  # four segments
        f"{token}.",  # four segments, last empty
        f"{header_b64}.{payload_b64}",  # two segments
        header_b64,
        "..",
        "a.b.c",
        "not a jwt",
        f"{header_b64}=.{payload_b64}.{signature_b64}",  # padding is not base64url
        f"{header_b64[:-1]}+.{payload_b64}.{signature_b64}",
        f"{header_b64[:-1]}/.{payload_b64}.{signature_b64}",
        f"{header_b64}.{payload_b64}.{signature_b64}=",
        f"{header_b64}.{payload_b64}.{signature_b64[:-1]}*",
        f"{header_b64}.{payload_b64}.{signature_b64[:-1]}é",
        f"{header_b64}.{payload_b64}.{signature_b64} ",
        f" {token}",
        f"{b64e(b'not json')}.{payload_b64}.{signature_b64}",
        f"{b64e(b'[1, 2]')}.{payload_b64}.{signature_b64}",
        f"{b64e(bytes([0xFF, 0xFE, 0x7B]))}.{payload_b64}.{signature_b64}",  # not UTF-8
    ]
    for case in cases:
        await assert_rejected(server, case, MALFORMED)


async def test_bad_characters_in_the_payload_segment_are_rejected(server: LiveServer) -> None:
    """Non-base64url characters in the payload: valid=false, never an RPC error."""
    pair = await logged_in(server)
    header_b64, payload_b64, signature_b64 = pair.access_token.split(".")
    for payload in (
        payload_b64[:-1] + "*",
        payload_b64[:-1] + "+",
        payload_b64 + "=",
        payload_b64[:-1] + "é",  # not even ASCII
        payload_b64[:-1] + "\u2028",
    ):
        await assert_rejected(server, f"{header_b64}.{payload}.{signature_b64}")


async def test_validly_signed_garbage_is_malformed(server: LiveServer) -> None:
    """Signed with the service's own key, so only the payload's shape is at fault."""
    pair = await logged_in(server)
    key = await service_key(server)
    header_b64 = b64json({"alg": key.alg, "typ": "at+jwt", "kid": key.kid})
    good = claims_of(pair.access_token)
    for payload_b64 in (
        b64e(bytes([0x7B, 0x22, 0xFF, 0xFE, 0x22, 0x3A, 0x31, 0x7D])),  # invalid UTF-8
        b64e(b"not json"),
        b64e(b"[]"),
        b64e(b'"a string"'),
        b64e(b""),
        b64e(json.dumps(good).encode("utf-16")),
        b64json(good)[:-1] + "*",  # not base64url, yet validly signed
    ):
        token = sign_segments(key.alg, key.private_key, header_b64, payload_b64)
        await assert_rejected(server, token, MALFORMED)
    # The same header over good claims is accepted: the shape was the only problem.
    token = sign_segments(key.alg, key.private_key, header_b64, b64json(good))
    assert (await validate(server, token)).valid


async def test_a_refresh_token_is_not_an_access_token(server: LiveServer) -> None:
    pair = await logged_in(server)
    await assert_rejected(server, pair.refresh_token, MALFORMED)
    rotated = (
        await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
    ).tokens
    await assert_rejected(server, rotated.refresh_token, MALFORMED)


# 3. Claim checks, with tokens signed by the service's own key


class Signer:
    """Signs arbitrary claims with the service's key, starting from a valid baseline."""

    def __init__(self, key: SigningKey, baseline: dict[str, Any]) -> None:
        self.key = key
        self.baseline = baseline

    def token(
        self,
        *,
        drop: tuple[str, ...] = (),
        headers: dict[str, Any] | None = None,
        **changes: Any,
    ) -> str:
        claims = {k: v for k, v in {**self.baseline, **changes}.items() if k not in drop}
        return low_s(
            pyjwt.encode(
                claims,
                self.key.private_key,
                algorithm=self.key.alg,
                headers={"kid": self.key.kid, "typ": "at+jwt"} if headers is None else headers,
            )
        )


async def make_signer(server: LiveServer, clock: ManualClock) -> tuple[Signer, Any]:
    pair = await logged_in(server)
    key = await service_key(server)
    now = int(clock.now())
    baseline = {
        "iss": server.settings.issuer,
        "sub": claims_of(pair.access_token)["sub"],
        "aud": server.settings.audience,
        "exp": now + 300,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "sid": pair.session_id,
        "scope": "read write",
    }
    return Signer(key, baseline), pair


async def test_baseline_token_signed_with_the_service_key_is_valid(
    server: LiveServer, clock: ManualClock
) -> None:
    signer, pair = await make_signer(server, clock)
    verdict = await validate(server, signer.token())
    assert verdict.valid, verdict
    assert verdict.session_id == pair.session_id
    # The full media type is accepted as typ too (RFC 7515 §4.1.9).
    media_type = {"kid": signer.key.kid, "typ": "application/at+jwt"}
    assert (await validate(server, signer.token(headers=media_type))).valid


REQUIRED_CLAIMS = ("exp", "sub", "jti", "sid", "iat", "iss", "aud")
WRONG_TYPES: tuple[tuple[str, object], ...] = (
    ("exp", "1900000300"),
    ("iat", "now"),
    ("exp", None),
    ("exp", True),
    ("sub", 42),
    ("sub", ""),
    ("sid", ["x"]),
    ("jti", None),
    ("scope", ["read", "write"]),
    ("aud", []),
    ("aud", [1]),
    ("nbf", "soon"),
    # The session's generation (see tests/test_user_revocation.py): a whole number >= 0.
    ("ugen", "0"),
    ("ugen", True),
    ("ugen", -1),
    ("ugen", 1.0),
    ("ugen", 2**63),
    ("ugen", None),
)


async def test_a_missing_required_claim_is_malformed(
    server: LiveServer, clock: ManualClock
) -> None:
    signer, _ = await make_signer(server, clock)
    assert (await validate(server, signer.token())).valid
    for claim in REQUIRED_CLAIMS:
        await assert_rejected(server, signer.token(drop=(claim,)), MALFORMED)


async def test_a_claim_of_the_wrong_type_is_malformed(
    server: LiveServer, clock: ManualClock
) -> None:
    signer, _ = await make_signer(server, clock)
    for claim, value in WRONG_TYPES:
        change: dict[str, Any] = {claim: value}
        await assert_rejected(server, signer.token(**change), MALFORMED)


async def test_lifetime_claims(server: LiveServer, clock: ManualClock) -> None:
    signer, _ = await make_signer(server, clock)
    now = int(clock.now())
    await assert_rejected(server, signer.token(exp=now - 1), auth_pb2.VALIDATION_ERROR_EXPIRED)
    await assert_rejected(server, signer.token(exp=now), auth_pb2.VALIDATION_ERROR_EXPIRED)
    assert (await validate(server, signer.token(exp=now + 1))).valid
    not_yet = auth_pb2.VALIDATION_ERROR_NOT_YET_VALID
    await assert_rejected(server, signer.token(iat=now + 60), not_yet)
    await assert_rejected(server, signer.token(nbf=now + 60), not_yet)
    assert (await validate(server, signer.token(nbf=now))).valid
    assert (await validate(server, signer.token(iat=now - 60))).valid


async def test_wrong_issuer_and_wrong_typ_are_malformed(
    server: LiveServer, clock: ManualClock
) -> None:
    signer, _ = await make_signer(server, clock)
    kid = signer.key.kid
    await assert_rejected(server, signer.token(iss="someone-else"), MALFORMED)
    await assert_rejected(server, signer.token(iss=server.settings.issuer + " "), MALFORMED)
    for headers in (
        {"kid": kid, "typ": "JWT"},
        {"kid": kid},
        {"kid": kid, "typ": "at+jwt+x"},
        {"kid": kid, "typ": 1},
    ):
        await assert_rejected(server, signer.token(headers=headers), MALFORMED)


async def test_audience_and_scope_requirements(server: LiveServer, clock: ManualClock) -> None:
    signer, _ = await make_signer(server, clock)
    aud = server.settings.audience
    token = signer.token()
    verdict = await validate(server, token, audience="other")
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE
    assert (await validate(server, token, audience=aud)).valid
    assert (await validate(server, token)).valid

    listed = signer.token(aud=["other", aud])
    assert (await validate(server, listed, audience=aud)).valid
    assert (await validate(server, listed, audience="other")).valid
    verdict = await validate(server, listed, audience="third")
    assert verdict.error == auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE

    assert (await validate(server, token, required_scopes=("read", "write"))).valid
    verdict = await validate(server, token, required_scopes=("read", "admin"))
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE
    # A scope is a whole word of the space-separated list, not a substring.
    verdict = await validate(server, signer.token(scope="readers"), required_scopes=("read",))
    assert verdict.error == auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE
    no_scope = signer.token(drop=("scope",))
    assert (await validate(server, no_scope)).valid
    verdict = await validate(server, no_scope, required_scopes=("read",))
    assert verdict.error == auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE


async def test_a_revoked_session_outranks_a_valid_signature(
    server: LiveServer, clock: ManualClock
) -> None:
    signer, pair = await make_signer(server, clock)
    response = await server.stub.Revoke(
        auth_pb2.RevokeRequest(session_id=pair.session_id),
        metadata=(("authorization", f"Bearer {pair.access_token}"),),
    )
    assert response.revoked_sessions == 1
    await assert_rejected(server, signer.token(), auth_pb2.VALIDATION_ERROR_REVOKED)


# 4. What a valid verdict carries


async def test_a_valid_verdict_reports_the_token_claims(server: LiveServer) -> None:
    user = await server.create_user("alice", scopes=("read", "write", "admin"))
    pair = await server.login("alice", scopes=("write", "read"))
    claims = claims_of(pair.access_token)
    verdict = await validate(server, pair.access_token, required_scopes=("read",))
    assert verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_UNSPECIFIED
    assert verdict.subject == claims["sub"] == str(user.id)
    assert verdict.session_id == claims["sid"] == pair.session_id
    assert list(verdict.scopes) == claims["scope"].split() == ["write", "read"]
    assert verdict.expires_at.seconds == claims["exp"]
    assert verdict.expires_at.seconds == pair.access_token_expires_at.seconds
    assert verdict.token_id == claims["jti"]
    assert verdict.token_id


async def test_access_token_expiry_boundary(server: LiveServer, clock: ManualClock) -> None:
    pair = await logged_in(server)
    clock.advance(server.settings.access_ttl - 1)
    assert (await validate(server, pair.access_token)).valid
    clock.advance(1)
    # Verified once already: the cache must not skip the lifetime check.
    await assert_rejected(server, pair.access_token, auth_pb2.VALIDATION_ERROR_EXPIRED)


async def test_a_token_has_exactly_one_spelling(server: LiveServer) -> None:
    """Changing the spare bits of a segment's last base64url character decodes to the same
    bytes; such a respelling must not validate (no malleable tokens)."""
    await server.create_user("speller")
    pair = await server.login("speller")
    header, payload, signature = pair.access_token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = signature[-1]
    # ES256 signatures are 64 bytes: 86 characters, the last carrying 4 spare bits.
    respelled = alphabet[alphabet.index(last) | 0b0001]
    if respelled == last:
        respelled = alphabet[alphabet.index(last) & ~0b0001]
    assert base64.urlsafe_b64decode(signature + "==") == base64.urlsafe_b64decode(
        signature[:-1] + respelled + "=="
    )
    verdict = await validate(server, f"{header}.{payload}.{signature[:-1]}{respelled}")
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_MALFORMED
    assert (await validate(server, pair.access_token)).valid
