"""Access tokens: JWTs per RFC 9068, signed with the key ring in force, verified strictly.

Verification parses the token once, checks the signature with the key named by
`kid` and the algorithm pinned to that key (so `none`, HMAC and algorithm
confusion are impossible), then checks each claim in a small validator, with
time from the injected clock.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import Algorithm, get_default_algorithms

from service.clock import Clock
from service.domain.jws_signing import COMPACT_JSON, EcdsaSigner, TokenIds
from service.domain.keys import ACCESS_TOKEN_TYPE, CurrentKeys, PublicKey, SigningKey

TOKEN_TYPE = ACCESS_TOKEN_TYPE
# RFC 9068 §4: "at+jwt"; the full media type is accepted too (RFC 7515 §4.1.9).
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+")
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
# A private claim: the session's generation among its user's (see AccessClaims.generation).
GENERATION_CLAIM = "ugen"
_MAX_GENERATION = 2**63 - 1  # a PostgreSQL bigint
# What our key ids look like (secrets.token_urlsafe(12)); anything else is no key of ours.
_KID_RE = re.compile(r"[A-Za-z0-9_-]{16}")
# iat/nbf may be this far ahead of the clock even with AUTH_LEEWAY=0: a token stamped by
# a clock a little ahead is no risk, and rejecting it breaks clients for nothing.
START_LEEWAY_SECONDS = 5

# The group order n of each curve pyjwt offers ECDSA on (SEC 2). ECDSA's (r, s) and
# (r, n - s) both verify; only s <= n/2 ("low s") is signed or accepted, so that a token
# has one spelling (the verified-token cache and any client's cache key on the string).
ECDSA_CURVE_ORDERS: dict[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "C7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
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


class TokenProblem(enum.Enum):
    """Why an access token is not valid; mirrors auth.v1.ValidationError."""

    MALFORMED = "MALFORMED"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    REVOKED = "REVOKED"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"


class TokenRejected(Exception):
    """An access token failed a check."""

    def __init__(self, problem: TokenProblem, *, unknown_kid: str | None = None) -> None:
        super().__init__(problem.value)
        self.problem = problem
        self.unknown_kid = unknown_kid
        """Set when the token names a key this process has not loaded (maybe brand new)."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token."""

    subject: str
    session_id: str
    token_id: str
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    issued_at: float
    expires_at: float
    not_before: float | None
    generation: int = 0
    """The user's session generation when the session started (claim `ugen`; 0 when absent,
    as in tokens signed before it existed): a revocation of all the user's sessions raises
    the user's generation, and every token carrying a lower one is revoked."""


@dataclass(frozen=True, slots=True)
class IssuedAccessToken:
    """A freshly signed token and its expiry."""

    token: str
    expires_at: int


def _b64decode(segment: str) -> bytes:
    # Strict base64url: urlsafe_b64decode alone would skip stray characters,
    # letting many strings decode to the same signature.
    if _SEGMENT_RE.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise TokenRejected(TokenProblem.MALFORMED)
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenRejected(TokenProblem.MALFORMED) from None
    # Canonical only: the spare low bits of the last character must be zero, or many
    # strings would carry one signature (a token must have exactly one spelling).
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise TokenRejected(TokenProblem.MALFORMED)
    return raw


def _ecdsa_halves(signature: bytes, public_key: PublicKey) -> tuple[int, int, int, int] | None:
    """(r, s, n, size of each half) of a raw JWS ECDSA signature; None if it is not one
    for this key's curve (a curve we know no order for counts as not one)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return None
    order = ECDSA_CURVE_ORDERS.get(public_key.curve.name)
    size = (public_key.curve.key_size + 7) // 8
    if order is None or len(signature) != 2 * size:
        return None
    return (
        int.from_bytes(signature[:size], "big"),
        int.from_bytes(signature[size:], "big"),
        order,
        size,
    )


def _is_canonical_signature(signature: bytes, public_key: PublicKey) -> bool:
    """ECDSA: 0 < r < n and 0 < s <= n/2 (the other algorithms' libraries already allow
    one encoding only: RSA needs s < n at the modulus' length, Ed25519 S < L)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return True
    halves = _ecdsa_halves(signature, public_key)
    if halves is None:
        return False
    r, s, order, _ = halves
    return 0 < r < order and 0 < s <= order // 2


def _low_s(signature: bytes, public_key: PublicKey) -> bytes:
    """An ECDSA signature with s replaced by n - s when s is the high one (both verify)."""
    halves = _ecdsa_halves(signature, public_key)
    if halves is None:
        return signature
    r, s, order, size = halves
    if s <= order // 2:
        return signature
    return r.to_bytes(size, "big") + (order - s).to_bytes(size, "big")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenRejected(TokenProblem.MALFORMED) from None
    if not isinstance(value, dict):
        raise TokenRejected(TokenProblem.MALFORMED)
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def token_lifetime(now: float, ttl: int) -> tuple[int, int]:
    """The `iat` and `exp` of an access token issued at `now` for `ttl` seconds. Computed
    before the database call that records `exp` as the session's bound, and then signed
    with exactly these values."""
    issued_at = int(now)
    return issued_at, issued_at + ttl


class AccessTokenCodec:
    """Signs and verifies this service's access tokens."""

    def __init__(self, *, issuer: str, keys: CurrentKeys, clock: Clock, leeway: int) -> None:
        self._issuer = issuer
        # Read at each use: the owner of the keys swaps its ring on every rotation.
        self._keys = keys
        self._clock = clock
        self._leeway = leeway
        self._token_ids = TokenIds()
        self._signers: dict[str, tuple[SigningKey, EcdsaSigner | None]] = {}

    def sign(
        self,
        *,
        subject: str,
        session_id: str,
        audience: str,
        scopes: tuple[str, ...],
        issued_at: int,
        expires_at: int,
        generation: int,
    ) -> IssuedAccessToken:
        """A token with exactly these `iat` and `exp` (see `token_lifetime`) and the session's
        `generation`, signed with the key active now."""
        key = self._keys.ring.signing_key(self._clock.now())
        claims = {
            "iss": self._issuer,
            "sub": subject,
            "aud": audience,
            "exp": expires_at,
            "iat": issued_at,
            "jti": self._token_ids.next_hex(),
            "sid": session_id,
            "scope": " ".join(scopes),
            GENERATION_CLAIM: generation,
        }
        # What jwt.encode would write, byte for byte, without its per-call work: the header
        # is the key's, made once; the key object is used as it is.
        payload = base64.urlsafe_b64encode(COMPACT_JSON.encode(claims).encode()).rstrip(b"=")
        signing_input = f"{key.jws_header_b64}.{payload.decode('ascii')}".encode("ascii")
        signer = self._ecdsa_signer(key)
        if signer is not None:
            signature = signer.sign(signing_input)
        else:
            signature = _ALGORITHMS[key.alg].sign(signing_input, key.private_key)
            if isinstance(key.public_key, ec.EllipticCurvePublicKey):
                signature = _low_s(signature, key.public_key)
        encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
        return IssuedAccessToken(
            token=f"{signing_input.decode('ascii')}.{encoded}", expires_at=expires_at
        )

    def _ecdsa_signer(self, key: SigningKey) -> EcdsaSigner | None:
        """The key's ECDSA signer (None: not an EC key), made at its first use."""
        cached = self._signers.get(key.kid)
        if cached is not None and cached[0] is key:
            return cached[1]
        signer = EcdsaSigner.for_key(key.alg, key.private_key, ECDSA_CURVE_ORDERS)
        # One entry per key ever used to sign: a handful over a process's life.
        self._signers[key.kid] = (key, signer)
        return signer

    def verify(self, token: str, *, check_time: bool = True) -> AccessClaims:
        """Verify signature and claims; raise TokenRejected naming the first problem."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRejected(TokenProblem.MALFORMED)
        header_b64, payload_b64, signature_b64 = parts
        if _SEGMENT_RE.fullmatch(payload_b64) is None:
            # Checked before the signature: the signing input must be ASCII.
            raise TokenRejected(TokenProblem.MALFORMED)
        header = _json_object(_b64decode(header_b64))
        self._check_type(header)
        kid = header.get("kid")
        key = self._keys.ring.verification_key(kid)
        if key is None:
            plausible = isinstance(kid, str) and _KID_RE.fullmatch(kid) is not None
            raise TokenRejected(TokenProblem.BAD_SIGNATURE, unknown_kid=kid if plausible else None)
        if header.get("alg") != key.alg:
            raise TokenRejected(TokenProblem.BAD_SIGNATURE)
        signature = _b64decode(signature_b64)
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        if not _is_canonical_signature(signature, key.public_key) or not _ALGORITHMS[
            key.alg
        ].verify(signing_input, key.public_key, signature):
            raise TokenRejected(TokenProblem.BAD_SIGNATURE)
        claims = _json_object(_b64decode(payload_b64))
        self._check_required(claims)
        self._check_issuer(claims)
        verified = AccessClaims(
            subject=claims["sub"],
            session_id=claims["sid"],
            token_id=claims["jti"],
            scopes=tuple(claims.get("scope", "").split()),
            audiences=self._audiences(claims),
            issued_at=claims["iat"],
            expires_at=claims["exp"],
            not_before=claims.get("nbf"),
            generation=claims.get(GENERATION_CLAIM, 0),
        )
        if check_time:
            self.check_lifetime(verified)
        return verified

    def check_lifetime(self, claims: AccessClaims) -> None:
        """exp, iat and nbf against the clock, with the configured leeway (at least
        START_LEEWAY_SECONDS for iat and nbf)."""
        now = self._clock.now()
        if now >= claims.expires_at + self._leeway:
            raise TokenRejected(TokenProblem.EXPIRED)
        latest_start = now + max(self._leeway, START_LEEWAY_SECONDS)
        if claims.issued_at > latest_start or (claims.not_before or 0) > latest_start:
            raise TokenRejected(TokenProblem.NOT_YET_VALID)

    @staticmethod
    def _check_type(header: dict[str, Any]) -> None:
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise TokenRejected(TokenProblem.MALFORMED)
        # Keys are never taken from the token: such headers mark a forgery attempt.
        if any(name in header for name in ("jwk", "jku", "x5u", "x5c", "crit")):
            raise TokenRejected(TokenProblem.MALFORMED)

    @staticmethod
    def _check_required(claims: dict[str, Any]) -> None:
        for name in ("sub", "jti", "sid", "iss"):
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                raise TokenRejected(TokenProblem.MALFORMED)
        for name in ("exp", "iat"):
            if not _is_number(claims.get(name)):
                raise TokenRejected(TokenProblem.MALFORMED)
        if "nbf" in claims and not _is_number(claims["nbf"]):
            raise TokenRejected(TokenProblem.MALFORMED)
        if not isinstance(claims.get("scope", ""), str):
            raise TokenRejected(TokenProblem.MALFORMED)
        generation = claims.get(GENERATION_CLAIM, 0)
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not 0 <= generation <= _MAX_GENERATION
        ):
            raise TokenRejected(TokenProblem.MALFORMED)
        AccessTokenCodec._audiences(claims)

    def _check_issuer(self, claims: dict[str, Any]) -> None:
        if claims["iss"] != self._issuer:
            raise TokenRejected(TokenProblem.MALFORMED)

    @staticmethod
    def _audiences(claims: dict[str, Any]) -> tuple[str, ...]:
        aud = claims.get("aud")
        if isinstance(aud, str) and aud:
            return (aud,)
        if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            return tuple(aud)
        raise TokenRejected(TokenProblem.MALFORMED)
