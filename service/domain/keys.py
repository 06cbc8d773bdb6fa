"""Signing keys: generated, stored sealed in PostgreSQL, parsed into key objects once.

Every replica verifies with every unretired key and signs with the newest active
one, so a token signed anywhere validates everywhere (see `service.domain.signing_keys`
for rotation and retirement).
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from service.domain.records import SigningKeyRecord
from service.secrets_box import SecretBox

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_RSA_BITS = 3072
# The `typ` of our access tokens (RFC 9068 §2.1).
ACCESS_TOKEN_TYPE = "at+jwt"


def _generate_private_key(alg: str) -> PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


# The public members of each key type (RFC 7518 §6.2.1, §6.3.1; RFC 8037 §2), the only
# ones taken from pyjwt's export: its RSA export adds `key_ops`, which no other type has.
_PUBLIC_MEMBERS: dict[str, tuple[str, ...]] = {
    "OKP": ("kty", "crv", "x"),
    "EC": ("kty", "crv", "x", "y"),
    "RSA": ("kty", "n", "e"),
}


def public_jwk(public_key: PublicKey, *, kid: str, alg: str) -> dict[str, str]:
    """The JWK GetJwks publishes for a key: its type's public members, `kid`, `alg` and
    `use: sig`, the same for every algorithm. No `key_ops`: RFC 7517 §4.3 says not to give
    both, and `use` is what JOSE libraries read. Built from the key, so nothing else (a
    private member) can be in it."""
    exported: dict[str, Any]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        exported = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        exported = ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        exported = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    jwk = {name: exported[name] for name in _PUBLIC_MEMBERS[exported["kty"]]}
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def _seal_label(kid: str) -> str:
    return f"signing-key:{kid}"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key pair ready to use: parsed once, never per call."""

    kid: str
    alg: str
    private_key: PrivateKey
    public_key: PublicKey
    public_jwk: dict[str, str]
    created_at: datetime
    activates_at: float
    """Epoch seconds from which it signs (it verifies from the moment it is loaded)."""
    jws_header_b64: str = field(init=False)
    """The base64url JWS header of the access tokens it signs (`alg`, `kid`, `typ`, keys
    sorted, as pyjwt spells it): the same for every token, so made once per key."""

    def __post_init__(self) -> None:
        header = json.dumps(
            {"alg": self.alg, "kid": self.kid, "typ": ACCESS_TOKEN_TYPE},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        object.__setattr__(
            self, "jws_header_b64", base64.urlsafe_b64encode(header).rstrip(b"=").decode()
        )


def generate_signing_key(
    alg: str, box: SecretBox, now: datetime, *, activates_at: datetime | None = None
) -> SigningKeyRecord:
    """A new key pair, its private half sealed for storage."""
    private_key = _generate_private_key(alg)
    kid = secrets.token_urlsafe(12)
    jwk = public_jwk(private_key.public_key(), kid=kid, alg=alg)
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKeyRecord(
        kid=kid,
        alg=alg,
        public_jwk=jwk,
        private_key_sealed=box.seal(der, label=_seal_label(kid)),
        created_at=now,
        activates_at=activates_at or now,
        retired_at=None,
    )


def open_signing_key(record: SigningKeyRecord, box: SecretBox) -> SigningKey:
    """Unseal and parse a stored key (a retired key has nothing left to open)."""
    if record.private_key_sealed is None:
        raise ValueError(f"signing key {record.kid} is retired")
    der = box.open(record.private_key_sealed, label=_seal_label(record.kid))
    private_key = serialization.load_der_private_key(der, password=None)
    if not isinstance(private_key, PrivateKey):
        raise ValueError(f"signing key {record.kid}: unsupported key type")
    public_key = private_key.public_key()
    return SigningKey(
        kid=record.kid,
        alg=record.alg,
        private_key=private_key,
        public_key=public_key,
        # From the key, not the stored JSON: keys stored before `public_jwk` had one form
        # (RS256 ones carry `key_ops`) are published like new ones.
        public_jwk=public_jwk(public_key, kid=record.kid, alg=record.alg),
        created_at=record.created_at,
        activates_at=record.activates_at.timestamp(),
    )


@dataclass(frozen=True, slots=True)
class _RingState:
    by_kid: dict[str, SigningKey]
    newest_first: tuple[SigningKey, ...]  # by activation time
    jwks_json: str


def _ring_state(keys: list[SigningKey]) -> _RingState:
    if not keys:
        raise ValueError("the key ring needs at least one signing key")
    # The same order as SigningKeys reports: activation, then creation, then kid.
    ordered = sorted(keys, key=lambda k: (k.activates_at, k.created_at, k.kid))
    return _RingState(
        by_kid={k.kid: k for k in ordered},
        newest_first=tuple(reversed(ordered)),
        jwks_json=json.dumps({"keys": [k.public_jwk for k in ordered]}, separators=(",", ":")),
    )


class KeyRing:
    """A set of keys to sign and verify with: every unretired key verifies and is
    published; the newest one whose activation time has come signs.

    Never changed once made: a rotation makes a new ring (`SigningKeys` swaps its current
    one in one assignment), so a call on the event loop never sees half of a rotation.
    """

    def __init__(self, keys: list[SigningKey]) -> None:
        self._state = _ring_state(keys)

    def signing_key(self, now: float) -> SigningKey:
        """The key that signs at `now`: the newest active one (the oldest if none is yet)."""
        newest_first = self._state.newest_first
        for key in newest_first:
            if key.activates_at <= now:
                return key
        return newest_first[-1]

    def verification_key(self, kid: object) -> SigningKey | None:
        """The key named by an (untrusted) `kid` header, or None."""
        if not isinstance(kid, str):
            return None
        return self._state.by_kid.get(kid)

    @property
    def kids(self) -> tuple[str, ...]:
        """The loaded keys, newest first."""
        return tuple(k.kid for k in self._state.newest_first)

    @property
    def jwks_json(self) -> str:
        """The public keys as an RFC 7517 JWK Set."""
        return self._state.jwks_json


class CurrentKeys(Protocol):
    """Where the key ring in force is read, at each use (`SigningKeys` in the service)."""

    @property
    def ring(self) -> KeyRing: ...


@dataclass(frozen=True, slots=True)
class FixedKeys:
    """One key ring, for ever (benchmarks and tests of the codec alone)."""

    ring: KeyRing
