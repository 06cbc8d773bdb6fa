"""The cold check's shortcuts give what the longer way gave: ECDSA verified through
`cryptography` directly says what pyjwt's verify said (for the one accepted spelling), an
`exp` of whole seconds gives the datetime the Timestamp steps gave, and a header decoded
once is decoded as before (a bad one still refused, every time)."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from authsvc_client import token_check
from authsvc_client.token_check import ECDSA_CURVE_ORDERS, Rejected, signature_verifies
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

ALGORITHMS = get_default_algorithms()
P256_ORDER = ECDSA_CURVE_ORDERS["secp256r1"]


class Key:
    def __init__(self, alg: str, private_key: Any) -> None:
        self.alg = alg
        self.private_key = private_key
        self.public_key = private_key.public_key()


KEYS = [
    Key("ES256", ec.generate_private_key(ec.SECP256R1())),
    Key("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    Key("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
]


def _high_s(signature: bytes) -> bytes:
    r, s = signature[:32], int.from_bytes(signature[32:], "big")
    return r + (P256_ORDER - s).to_bytes(32, "big")


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.alg)
@given(message=st.binary(max_size=200), flip=st.integers(min_value=-1, max_value=600))
def test_a_signature_verifies_exactly_when_pyjwt_says_so_in_its_one_spelling(
    key: Key, message: bytes, flip: int
) -> None:
    algorithm = ALGORITHMS[key.alg]
    signature = algorithm.sign(message, key.private_key)
    if key.alg == "ES256" and int.from_bytes(signature[32:], "big") > P256_ORDER // 2:
        signature = _high_s(signature)  # the low-s spelling, as authsvc signs
    if 0 <= flip < 8 * len(signature):  # one bit of the signature changed
        flipped = bytearray(signature)
        flipped[flip // 8] ^= 1 << (flip % 8)
        signature = bytes(flipped)
    expected = algorithm.verify(message, key.public_key, signature)
    if key.alg == "ES256":
        s = int.from_bytes(signature[32:], "big")
        expected = expected and 0 < s <= P256_ORDER // 2
    assert signature_verifies(message, signature, key) is expected


def test_the_high_s_twin_of_a_good_signature_is_refused() -> None:
    key = KEYS[0]
    message = b"header.payload"
    while True:
        signature = ALGORITHMS["ES256"].sign(message, key.private_key)
        if int.from_bytes(signature[32:], "big") <= P256_ORDER // 2:
            break
    assert signature_verifies(message, signature, key)
    twin = _high_s(signature)
    assert ALGORITHMS["ES256"].verify(message, key.public_key, twin)
    assert not signature_verifies(message, twin, key)
    assert not signature_verifies(message, signature[:-1], key)


def _timestamp_steps(expires_at: float) -> datetime:
    ts = Timestamp()
    ts.FromNanoseconds(int(expires_at * 1_000_000_000))
    return ts.ToDatetime(tzinfo=UTC)


@given(
    st.integers(min_value=0, max_value=253_402_300_799)  # up to 9999-12-31T23:59:59Z
    | st.floats(min_value=0, max_value=253_402_300_799, allow_nan=False)
)
def test_the_expiry_datetime_is_what_the_timestamp_steps_give(expires_at: float) -> None:
    got = token_check._expiry_datetime(expires_at)
    assert got == _timestamp_steps(expires_at)
    assert got.tzinfo is UTC


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def test_a_header_decoded_once_is_the_same_and_a_bad_one_is_refused_every_time() -> None:
    good = _segment(b'{"alg":"ES256","typ":"at+jwt","kid":"k"}')
    assert token_check._header(good) == {"alg": "ES256", "typ": "at+jwt", "kid": "k"}
    assert token_check._header(good) is token_check._header(good)
    for bad in (_segment(b"[1]"), _segment(b"{"), "e30=", "e30x"):
        for _ in range(2):
            with pytest.raises(Rejected):
                token_check._header(bad)


def test_headers_kept_are_bounded() -> None:
    for i in range(1_000):
        token_check._header(_segment(b'{"n":%d}' % i))
    assert token_check._header.cache_info().currsize <= 64


def _b64decode_by_reencoding(segment: str) -> bytes | None:
    """The check as it was: decode, encode again, compare (None: refused)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", segment) is None or len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        return None
    return raw


def _decoded(segment: str) -> bytes | None:
    try:
        return token_check._b64decode(segment)
    except Rejected:
        return None


@given(st.binary(min_size=1, max_size=300), st.text("AQgw_-=+/ .\n\x00é", max_size=3))
def test_a_segment_decodes_exactly_when_its_one_spelling_would(raw: bytes, tail: str) -> None:
    segment = _segment(raw)
    assert _decoded(segment) == raw
    for variant in (segment + tail, segment[:-1] + tail, tail + segment, segment[:-1]):
        assert _decoded(variant) == _b64decode_by_reencoding(variant), variant


def test_every_last_character_of_a_partial_group_is_judged_as_before() -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for raw in (b"a", b"ab", b"abc", b"abcd", b"abcde"):
        for last in alphabet:
            segment = _segment(raw)[:-1] + last
            assert _decoded(segment) == _b64decode_by_reencoding(segment), segment


class _EcKey:
    alg = "ES256"

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = self.private_key.public_key()


def _signed_token(key: _EcKey, claims: str) -> str:
    """A token over `claims` (JSON text as given: NaN and Infinity too), low-s signed."""
    header = _segment(b'{"alg":"ES256","typ":"at+jwt","kid":"kid-1"}')
    signing_input = f"{header}.{_segment(claims.encode())}"
    signature = ALGORITHMS["ES256"].sign(signing_input.encode(), key.private_key)
    if int.from_bytes(signature[32:], "big") > P256_ORDER // 2:
        signature = _high_s(signature)
    return f"{signing_input}.{_segment(signature)}"


def _claims(**times: str) -> str:
    values = {"exp": "2000000000", "iat": "1900000000", **times}
    fields = ",".join(f'"{name}":{value}' for name, value in values.items())
    return '{"iss":"iss","sub":"u","aud":"a","jti":"j","sid":"s",' + fields + "}"


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
@pytest.mark.parametrize(
    "value", ["NaN", "Infinity", "-Infinity", "-1", "1e300", "253402300800", "1e20"]
)
def test_a_signed_time_claim_no_answer_can_hold_is_malformed(name: str, value: str) -> None:
    """Found by an outside review: a signed exp of 1e300 or Infinity raised from
    TokenChecker.check (OverflowError) instead of answering, and an iat or exp of NaN
    passed every comparison (NaN compares false: never expired, never too early)."""
    key = _EcKey()
    token = _signed_token(key, _claims(**{name: value}))
    with pytest.raises(Rejected) as rejected:
        token_check.verified_claims(token, lambda kid: key, "iss")
    assert rejected.value.reason == "MALFORMED"


def test_the_last_second_a_timestamp_holds_is_accepted() -> None:
    key = _EcKey()
    token = _signed_token(key, _claims(exp="253402300799", nbf="0.5"))
    _, claims = token_check.verified_claims(token, lambda kid: key, "iss")
    assert token_check._expiry_datetime(claims["exp"]) == datetime(
        9999, 12, 31, 23, 59, 59, tzinfo=UTC
    )
