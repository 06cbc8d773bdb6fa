"""The codec writes what pyjwt's `jwt.encode` would, byte for byte (header, claims and, for
the deterministic algorithms, signature), though it builds the header once per key."""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import UTC, datetime

import jwt
import pytest

from service.clock import SystemClock
from service.domain.access_tokens import TOKEN_TYPE, AccessTokenCodec, TokenProblem, TokenRejected
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
