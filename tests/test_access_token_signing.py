"""The codec writes what pyjwt's `jwt.encode` would, byte for byte (header, claims and, for
the deterministic algorithms, signature), though it builds the header once per key."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from service.clock import SystemClock
from service.domain.access_tokens import (
    ECDSA_CURVE_ORDERS,
    TOKEN_TYPE,
    AccessTokenCodec,
    TokenProblem,
    TokenRejected,
)
from service.domain.jws_signing import TokenIds, compact_json
from service.domain.keys import FixedKeys, KeyRing, generate_signing_key, open_signing_key
from service.secrets_box import SecretBox
from service.settings import SIGNING_ALGORITHMS


def _b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
def test_signed_tokens_are_what_pyjwt_would_write(alg: str) -> None:
    box = SecretBox(secrets.token_bytes(32))
    key = open_signing_key(generate_signing_key(alg, box, datetime.now(UTC)), box)
    codec = AccessTokenCodec(
        issuer="https://auth.example", keys=FixedKeys(KeyRing([key])), clock=SystemClock(), leeway=0
    )
    now = int(time.time())
    token = codec.sign(
        subject="user-1",
        session_id="session-1",
        audience="api",
        scopes=("read", "write"),
        issued_at=now,
        expires_at=now + 900,
        generation=3,
    ).token
    header, payload, signature = token.split(".")
    claims = json.loads(_b64d(payload))
    assert list(claims) == ["iss", "sub", "aud", "exp", "iat", "jti", "sid", "scope", "ugen"]
    expected = jwt.encode(
        claims, key.private_key, algorithm=alg, headers={"kid": key.kid, "typ": TOKEN_TYPE}
    )
    expected_header, expected_payload, _ = expected.split(".")
    assert (header, payload) == (expected_header, expected_payload)
    if alg in ("EdDSA", "RS256"):  # deterministic signatures
        assert token == expected
    # And it verifies, with pyjwt as with the codec itself.
    assert codec.verify(token).subject == "user-1"
    assert jwt.decode(token, key.public_key, algorithms=[alg], audience="api")["ugen"] == 3
    assert signature


def test_a_token_naming_a_key_not_loaded_reports_its_key_id_for_a_look() -> None:
    """The checks are the client package's; the server still needs the key id a token
    names when it is one of ours in shape (it then looks for new keys once) and nothing
    for any other id."""
    box = SecretBox(secrets.token_bytes(32))
    now = datetime.now(UTC)
    signer, other = (
        open_signing_key(generate_signing_key("EdDSA", box, now), box) for _ in range(2)
    )
    clock = SystemClock()
    issued = int(time.time())
    token = (
        AccessTokenCodec(issuer="authsvc", keys=FixedKeys(KeyRing([signer])), clock=clock, leeway=0)
        .sign(
            subject="s",
            session_id="sid",
            audience="a",
            scopes=(),
            issued_at=issued,
            expires_at=issued + 60,
            generation=0,
        )
        .token
    )
    codec = AccessTokenCodec(
        issuer="authsvc", keys=FixedKeys(KeyRing([other])), clock=clock, leeway=0
    )
    with pytest.raises(TokenRejected) as rejected:
        codec.verify(token)
    assert rejected.value.problem is TokenProblem.BAD_SIGNATURE
    assert rejected.value.unknown_kid == signer.kid
    header = json.loads(_b64d(token.split(".")[0]))
    odd = base64.urlsafe_b64encode(json.dumps({**header, "kid": "x"}).encode()).rstrip(b"=")
    with pytest.raises(TokenRejected) as rejected:
        codec.verify(odd.decode() + token[token.index(".") :])
    assert rejected.value.problem is TokenProblem.BAD_SIGNATURE
    assert rejected.value.unknown_kid is None


def _es256_codec() -> tuple[AccessTokenCodec, Any]:
    box = SecretBox(secrets.token_bytes(32))
    key = open_signing_key(generate_signing_key("ES256", box, datetime.now(UTC)), box)
    codec = AccessTokenCodec(
        issuer="https://auth.example", keys=FixedKeys(KeyRing([key])), clock=SystemClock(), leeway=0
    )
    return codec, key


def test_es256_signatures_are_low_s_and_verify_with_pyjwt() -> None:
    """Half of ECDSA's signatures come out with the high s: over 64 tokens both kinds are
    met, and every token carries the low one and verifies with pyjwt."""
    codec, key = _es256_codec()
    order = ECDSA_CURVE_ORDERS["secp256r1"]
    now = int(time.time())
    for _ in range(64):
        token = codec.sign(
            subject="user-1",
            session_id="session-1",
            audience="api",
            scopes=("read",),
            issued_at=now,
            expires_at=now + 900,
            generation=0,
        ).token
        signature = _b64d(token.split(".")[2])
        assert len(signature) == 64
        assert 0 < int.from_bytes(signature[32:], "big") <= order // 2
        assert jwt.decode(token, key.public_key, algorithms=["ES256"], audience="api")
        assert codec.verify(token).subject == "user-1"


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "https://auth.example.com", "exp": 1700000900, "scope": "a b", "ugen": 0},
        # Non-ASCII, quotes, backslashes and control characters escaped as json.dumps does.
        {"aud": "caf\u00e9 \U0001f600", "sub": 'a"b\\c\n\x00', "empty": ""},
        {"f": 1.5, "big": 2**70, "neg": -3, "t": True, "n": None, "l": [1, "x"], "d": {"k": 1}},
        {},
    ],
)
def test_compact_json_is_json_dumps_with_compact_separators(claims: dict[str, Any]) -> None:
    assert compact_json(claims) == json.dumps(claims, separators=(",", ":"))
    assert compact_json(claims) == json.dumps(claims, separators=(",", ":"))  # reused


def test_compact_json_refuses_what_json_dumps_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        compact_json({"when": datetime.now(UTC)})


def test_token_ids_are_uuid4_hex_and_unique() -> None:
    """jti keeps uuid4().hex's format (version 4, RFC 4122 variant), across refills of the
    random buffer, and no id repeats."""
    codec, _ = _es256_codec()
    now = int(time.time())
    ids = set()
    for _ in range(400):  # 400 x 16 bytes: more than one 4 KiB buffer
        token = codec.sign(
            subject="u",
            session_id="s",
            audience="api",
            scopes=(),
            issued_at=now,
            expires_at=now + 60,
            generation=0,
        ).token
        jti = json.loads(_b64d(token.split(".")[1]))["jti"]
        assert uuid.UUID(hex=jti).version == 4
        assert uuid.UUID(hex=jti).variant == uuid.RFC_4122
        assert uuid.UUID(hex=jti).hex == jti
        ids.add(jti)
    assert len(ids) == 400


def test_token_ids_differ_in_a_forked_child() -> None:
    """A buffer of random bytes filled before a fork is not used by both processes."""
    ids = TokenIds()
    ids.next_hex()  # the buffer is filled
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, ids.next_hex().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    in_child = os.read(reader, 64).decode()
    os.close(reader)
    assert len(in_child) == 32
    assert in_child != ids.next_hex()
