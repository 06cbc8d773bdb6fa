"""A token has exactly one spelling: no second string, built from a genuine token without
the key, may validate (or revoke). ECDSA's (r, n - s), signatures with extra bytes, base64url
with padding, the standard alphabet or non-zero spare bits are all refused, as Validate's
valid=false (never an RPC error), by Revoke as an unknown token, and never cached.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable

import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from service.clock import ManualClock
from service.domain.access_tokens import AccessTokenCodec, TokenProblem, TokenRejected
from service.domain.keys import FixedKeys, KeyRing, SigningKey
from tests.helpers import validate
from tests.live_server import LiveServer, ServerFactory

# The group orders n of the curves (SEC 2), kept here independently of the service's copy.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
CURVE_ORDERS = {
    "secp256r1": P256_ORDER,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FF"
        + "F" * 56
        + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
}
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493  # RFC 8032's L
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def ecdsa_s(signature: bytes) -> int:
    return int.from_bytes(signature[len(signature) // 2 :], "big")


def flip_s(token: str, order: int) -> str:
    """The same token with ECDSA's other valid signature, (r, n - s)."""
    header, payload, signature = token.split(".")
    raw = b64d(signature)
    half = len(raw) // 2
    s = int.from_bytes(raw[half:], "big")
    return f"{header}.{payload}.{b64e(raw[:half] + (order - s).to_bytes(half, 'big'))}"


def respell_last_character(segment: str) -> str:
    """The segment with its last character's spare bits changed: the same bytes decode."""
    last = segment[-1]
    spare_bits = {2: 0b1111, 3: 0b0011}[len(segment) % 4]
    for candidate in ALPHABET:
        if (
            candidate != last
            and ALPHABET.index(candidate) & ~spare_bits == ALPHABET.index(last) & ~spare_bits
        ):
            assert b64d(segment[:-1] + candidate) == b64d(segment)
            return segment[:-1] + candidate
    raise AssertionError("no spare bits in this segment")


async def assert_no_other_spelling_works(
    server: LiveServer, token: str, respellings: dict[str, str]
) -> None:
    # The genuine token first: it is in the verified-token cache when its twins arrive.
    assert (await validate(server, token)).valid
    for name, respelled in respellings.items():
        assert respelled != token, name
        verdict = await validate(server, respelled)
        assert not verdict.valid, name
        assert verdict.error in (
            auth_pb2.VALIDATION_ERROR_MALFORMED,
            auth_pb2.VALIDATION_ERROR_BAD_SIGNATURE,
        ), (name, verdict.error)
        assert verdict.session_id == ""
        # Revoke treats it as any unknown token: OK, nothing revoked.
        response = await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=respelled))
        assert response.revoked_sessions == 0, name
    assert (await validate(server, token)).valid


# ECDSA: (r, s) and (r, n - s)


async def test_a_high_s_es256_signature_is_refused(server: LiveServer) -> None:
    """Replacing s by n - s gives a second signature that verifies mathematically: the
    service signs only low-s signatures and refuses high-s ones."""
    await server.create_user("eve")
    pair = await server.login("eve")
    assert server.settings.signing_alg == "ES256"
    flipped = flip_s(pair.access_token, P256_ORDER)
    # The twin really is a valid ECDSA signature over the same signing input.
    header, payload, signature = flipped.split(".")
    key = server.running.components.signing_keys.ring.signing_key(server.clock.now())
    assert get_default_algorithms()["ES256"].verify(
        f"{header}.{payload}".encode(), key.public_key, b64d(signature)
    )
    await assert_no_other_spelling_works(server, pair.access_token, {"n - s": flipped})


async def test_every_es256_token_the_service_signs_is_low_s(server: LiveServer) -> None:
    """OpenSSL picks either s at random; the service keeps the low one, so its own tokens
    pass its own check (half of them would be refused otherwise)."""
    await server.create_user("lowell")
    for _ in range(24):
        pair = await server.login("lowell")
        assert ecdsa_s(b64d(pair.access_token.split(".")[2])) <= P256_ORDER // 2
        assert (await validate(server, pair.access_token)).valid


def _signing_key(alg: str, private_key: ec.EllipticCurvePrivateKey) -> SigningKey:
    return SigningKey(
        kid="k" * 16,
        alg=alg,
        private_key=private_key,
        public_key=private_key.public_key(),
        public_jwk={},
        created_at=datetime.datetime.now(datetime.UTC),
        activates_at=0.0,
    )


@pytest.mark.parametrize(
    ("alg", "curve"),
    [
        ("ES256", ec.SECP256R1()),
        ("ES384", ec.SECP384R1()),
        ("ES512", ec.SECP521R1()),
        ("ES256K", ec.SECP256K1()),
    ],
)
def test_every_ecdsa_algorithm_signs_low_s_and_refuses_high_s(
    alg: str, curve: ec.EllipticCurve
) -> None:
    """The codec's rule holds for every ECDSA curve pyjwt offers, not only the default's
    (and the curve orders it uses are right: n - s verifies only with the true order)."""
    keys = FixedKeys(KeyRing([_signing_key(alg, ec.generate_private_key(curve))]))
    codec = AccessTokenCodec(
        issuer="authsvc",
        keys=keys,
        clock=ManualClock(start=1_900_000_000.0),
        leeway=0,
    )
    order = CURVE_ORDERS[curve.name]
    verifier = get_default_algorithms()[alg]
    public_key = keys.ring.signing_key(0).public_key
    for _ in range(16):
        token = codec.sign(
            subject="s",
            session_id="sid",
            audience="a",
            scopes=(),
            issued_at=1_900_000_000,
            expires_at=1_900_000_060,
            generation=0,
        ).token
        signature = b64d(token.split(".")[2])
        assert ecdsa_s(signature) <= order // 2
        assert codec.verify(token).subject == "s"
        flipped = flip_s(token, order)
        header, payload, flipped_signature = flipped.split(".")
        assert verifier.verify(f"{header}.{payload}".encode(), public_key, b64d(flipped_signature))
        with pytest.raises(TokenRejected) as rejected:
            codec.verify(flipped)
        assert rejected.value.problem == TokenProblem.BAD_SIGNATURE


# Other algorithms: their libraries already refuse the arithmetic twins; kept as proof.


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
async def test_eddsa_s_plus_l_is_refused(server_factory: ServerFactory) -> None:
    server = await server_factory(signing_alg="EdDSA")
    await server.create_user("ed")
    pair = await server.login("ed")
    header, payload, signature = pair.access_token.split(".")
    raw = b64d(signature)
    s = int.from_bytes(raw[32:], "little")
    twin = raw[:32] + (s + ED25519_ORDER).to_bytes(32, "little")
    await assert_no_other_spelling_works(
        server, pair.access_token, {"S + L": f"{header}.{payload}.{b64e(twin)}"}
    )


async def test_rs256_s_plus_n_and_padded_signatures_are_refused(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(signing_alg="RS256")
    await server.create_user("rsa")
    pair = await server.login("rsa")
    header, payload, signature = pair.access_token.split(".")
    raw = b64d(signature)
    key = server.running.components.signing_keys.ring.signing_key(server.clock.now())
    assert isinstance(key.public_key, rsa.RSAPublicKey)
    modulus = key.public_key.public_numbers().n
    s = int.from_bytes(raw, "big")
    padded = b64e(bytes(1) + raw)
    respellings = {"leading zero byte": f"{header}.{payload}.{padded}"}
    if s + modulus < 2 ** (8 * len(raw)):
        respellings["s + n"] = f"{header}.{payload}.{b64e((s + modulus).to_bytes(len(raw), 'big'))}"
    await assert_no_other_spelling_works(server, pair.access_token, respellings)


# base64url: one alphabet, no padding, zero spare bits, in every segment


Respell = Callable[[str], str]
SEGMENT_RESPELLINGS: dict[str, Respell] = {
    "padding": lambda segment: segment + "=" * (-len(segment) % 4 or 4),
    "spare bits": respell_last_character,
    "standard alphabet": lambda segment: segment.replace("-", "+").replace("_", "/"),
    "whitespace": lambda segment: segment[:4] + " " + segment[4:],
}


@pytest.mark.parametrize("segment_index", [0, 1, 2], ids=["header", "payload", "signature"])
async def test_no_segment_has_a_second_base64url_spelling(
    server: LiveServer, segment_index: int
) -> None:
    await server.create_user("bea")
    respellings: dict[str, str] = {}
    token = ""
    # Log in until the segment has spare bits and a character that differs between the
    # two alphabets, so that every respelling applies (the header never changes).
    for _ in range(40):
        token = (await server.login("bea")).access_token
        segment = token.split(".")[segment_index]
        if (len(segment) % 4 != 0 and ("-" in segment or "_" in segment)) or segment_index == 0:
            break
    parts = token.split(".")
    for name, respell in SEGMENT_RESPELLINGS.items():
        if name == "spare bits" and len(parts[segment_index]) % 4 == 0:
            continue
        respelled = respell(parts[segment_index])
        if respelled == parts[segment_index]:
            continue
        respellings[name] = ".".join(
            respelled if i == segment_index else part for i, part in enumerate(parts)
        )
    assert "padding" in respellings
    await assert_no_other_spelling_works(server, token, respellings)


async def test_the_same_claims_in_other_json_do_not_validate(server: LiveServer) -> None:
    """Re-serialising the header or payload (spaces, key order) changes the signing input,
    so the genuine signature no longer fits."""
    await server.create_user("jason")
    pair = await server.login("jason")
    header, payload, signature = pair.access_token.split(".")
    spaced_payload = b64e(json.dumps(json.loads(b64d(payload)), indent=1).encode())
    reordered_header = b64e(
        json.dumps(dict(reversed(json.loads(b64d(header)).items())), separators=(",", ":")).encode()
    )
    await assert_no_other_spelling_works(
        server,
        pair.access_token,
        {
            "payload": f"{header}.{spaced_payload}.{signature}",
            "header": f"{reordered_header}.{payload}.{signature}",
        },
    )
