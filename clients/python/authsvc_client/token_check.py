"""Checking an authsvc access token in the caller's process, exactly as authsvc's Validate
does: the same checks in the same order, so the same token gets the same verdict.

Pure and synchronous: the keys (a JWK Set) and the revocations are given; `LocalValidator`
(authsvc_client.local_validator) keeps them current from authsvc's WatchRevocations stream.
The server runs the same code for what both decide alone: `verified_claims` (the token's
spelling, signature and claims) and `lifetime_problem` (its AccessTokenCodec calls them with
its key ring), the revocation rule (`Revocations`: its RevocationState holds one), the
verified-token cache, a ValidateRequest's limits and the leeway's cap. What stays mirrored
is only the order of the checks (the server's validation.py).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from google.protobuf.timestamp_pb2 import Timestamp
from jwt.algorithms import Algorithm, get_default_algorithms

from authsvc_client.client import AuthServiceError, Validation

__all__ = [
    "ECDSA_CURVE_ORDERS",
    "GENERATION_CLAIM",
    "MAX_AUDIENCE_BYTES",
    "MAX_LEEWAY_SECONDS",
    "MAX_SCOPES",
    "MAX_SCOPE_BYTES",
    "MAX_TOKEN_BYTES",
    "SCOPE_TOKEN_RE",
    "START_LEEWAY_SECONDS",
    "Checked",
    "KeySet",
    "Rejected",
    "Revocations",
    "TokenChecker",
    "VerificationKey",
    "VerifiedClaims",
    "VerifiedTokenCache",
    "check_request",
    "claim_audiences",
    "lifetime_problem",
    "verified_claims",
]

# A request's limits (the proto's comments say them; the server's request_limits.py holds
# every request to them, and AUTH_AUDIENCES entries to MAX_AUDIENCE_BYTES).
MAX_TOKEN_BYTES = 8 * 1024
MAX_SCOPES = 32
MAX_SCOPE_BYTES = 128
MAX_AUDIENCE_BYTES = 256
# RFC 6749 §3.3 scope-token: printable ASCII except space, '"' and '\'.
SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")

# authsvc's largest AUTH_LEEWAY: it remembers a revocation (the stream's keep_until) this
# long past its session's last exp, and this checker forgets it then. A larger leeway would
# take a revoked session's token as valid again once its revocation is forgotten.
MAX_LEEWAY_SECONDS = 300
# iat/nbf may be this far ahead of the clock even with leeway 0: a token stamped by a clock
# a little ahead is no risk, and rejecting it breaks clients for nothing.
START_LEEWAY_SECONDS = 5
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STANDARD_B64 = bytes.maketrans(b"-_", b"+/")
# A last group of 2 (3) characters carries 8 (16) bits in 12 (18): the low 4 (2) are unused.
_UNUSED_BITS = {2: 0x0F, 3: 0x03}
# What authsvc's key ids look like (secrets.token_urlsafe(12)); anything else is no key of
# its own.
_KID_RE = re.compile(r"[A-Za-z0-9_-]{16}")
# A private claim: the session's generation among its user's (a revocation of all the
# user's sessions raises the user's generation; a token with a lower one is revoked).
GENERATION_CLAIM = "ugen"
_MAX_GENERATION = 2**63 - 1  # a PostgreSQL bigint
_FORBIDDEN_HEADERS = ("jwk", "jku", "x5u", "x5c", "crit")
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
# The algorithms authsvc signs with, and the key type each needs.
_KEY_TYPES: dict[str, type[Any]] = {
    "EdDSA": ed25519.Ed25519PublicKey,
    "ES256": ec.EllipticCurvePublicKey,
    "RS256": rsa.RSAPublicKey,
}
# The group order n of each curve pyjwt offers ECDSA on (SEC 2). ECDSA's (r, s) and
# (r, n - s) both verify; only s <= n/2 ("low s") is signed or accepted, so that a token
# has one spelling (verified-token caches key on the string).
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

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class VerificationKey(Protocol):
    """A key a token may name (by `kid`): the one algorithm it verifies and its public
    half. The server's SigningKey is one, and so is a key of a KeySet."""

    @property
    def alg(self) -> str: ...

    @property
    def public_key(self) -> PublicKey: ...


class Rejected(Exception):
    """A token failed a check; `reason` is the ValidationError name without its prefix."""

    def __init__(
        self,
        reason: str,
        *,
        unknown_kid: bool = False,
        wrong_issuer: bool = False,
        kid: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown_kid = unknown_kid
        """The token names a plausible key id this process has not been told of."""
        self.kid = kid
        """That key id, when `unknown_kid`."""
        self.wrong_issuer = wrong_issuer
        """Signed by a listed key, but its `iss` is not the configured issuer."""


@dataclass(frozen=True, slots=True)
class Checked:
    """A verdict, and what the caller may want to act on (look again, log)."""

    validation: Validation
    unknown_kid: bool = False
    wrong_issuer: bool = False


@dataclass(frozen=True, slots=True)
class VerifiedClaims:
    """The claims of a token whose signature verified (lifetime not yet checked)."""

    kid: str
    subject: str
    session_id: str
    token_id: str
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    issued_at: float
    expires_at: float
    not_before: float | None
    generation: int
    accepted: Checked
    """The answer when every later check passes, built once (a cache hit returns it)."""


@dataclass(frozen=True, slots=True)
class _Key:
    alg: str
    algorithm: Algorithm
    public_key: PublicKey


class KeySet:
    """A JWK Set parsed once into key objects: kid → (alg, key). Keys of an algorithm
    authsvc does not sign with, or whose material does not parse, are left out (`skipped`)."""

    def __init__(self, jwks_json: str) -> None:
        document = json.loads(jwks_json)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK Set")
        keys: dict[str, _Key] = {}
        skipped = 0
        for jwk in document["keys"]:
            parsed = _parse_jwk(jwk)
            if parsed is None:
                skipped += 1
                continue
            keys[jwk["kid"]] = parsed
        self.json = jwks_json
        self.skipped = skipped
        self._keys = keys

    def get(self, kid: object) -> _Key | None:
        return self._keys.get(kid) if isinstance(kid, str) else None

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _parse_jwk(jwk: object) -> _Key | None:
    if not isinstance(jwk, dict):
        return None
    kid, alg = jwk.get("kid"), jwk.get("alg")
    if not isinstance(kid, str) or not isinstance(alg, str) or alg not in _KEY_TYPES:
        return None
    if not _for_verifying(jwk):
        return None
    algorithm = _ALGORITHMS[alg]
    try:
        public_key = algorithm.from_jwk(jwk)
    except Exception:  # any malformed key material: the key is not usable, nothing more
        return None
    if not isinstance(public_key, _KEY_TYPES[alg]):
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name != "secp256r1":
        return None
    return _Key(alg=alg, algorithm=algorithm, public_key=public_key)


# Members only a private JWK has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _for_verifying(jwk: dict[str, Any]) -> bool:
    """Whether a JWK may verify signatures (RFC 7517 §4.2, §4.3): `use`, if given, is
    `sig`; `key_ops`, if given, is a list holding `verify`; no private member."""
    if jwk.get("use", "sig") != "sig" or _PRIVATE_MEMBERS & jwk.keys():
        return False
    key_ops = jwk.get("key_ops", ["verify"])
    return isinstance(key_ops, list) and "verify" in key_ops


class Revocations:
    """Revoked sessions and users, each until its `keep_until` (epoch seconds)."""

    def __init__(self) -> None:
        self.sessions: dict[str, float] = {}
        self.users: dict[str, tuple[int, float]] = {}  # subject → (generation, keep until)

    def add_session(self, session_id: str, keep_until: float) -> None:
        if self.sessions.get(session_id, float("-inf")) < keep_until:
            self.sessions[session_id] = keep_until

    def add_user(self, subject: str, generation: int, keep_until: float) -> None:
        known_generation, known_until = self.users.get(subject, (0, float("-inf")))
        # Generations only grow, and each bound covers the ones before it (as on the server).
        self.users[subject] = (max(known_generation, generation), max(known_until, keep_until))

    def is_revoked(self, claims: VerifiedClaims) -> bool:
        return self.is_token_revoked(claims.session_id, claims.subject, claims.generation)

    def is_token_revoked(self, session_id: str, subject: str, generation: int) -> bool:
        """The rule: a token is revoked when its session is, or when its user's sessions
        were all revoked at a generation above the one its session was started under."""
        return session_id in self.sessions or self.is_generation_revoked(subject, generation)

    def is_generation_revoked(self, subject: str, generation: int) -> bool:
        """Whether the sessions `subject` started under `generation` were all revoked."""
        user = self.users.get(subject)
        return user is not None and generation < user[0]

    def prune(self, now: float) -> int:
        """Forget entries past their keep_until; how many were dropped."""
        sessions = [sid for sid, until in self.sessions.items() if until <= now]
        for sid in sessions:
            del self.sessions[sid]
        users = [sub for sub, (_, until) in self.users.items() if until <= now]
        for sub in users:
            del self.users[sub]
        return len(sessions) + len(users)


def check_request(token: str, required_scopes: Sequence[str], audience: str) -> None:
    """Raise what authsvc answers a ValidateRequest over its limits: INVALID_ARGUMENT
    naming the fields (AuthServiceError, as AuthClient.validate raises it)."""
    fields: list[str] = []
    for name, value, limit, required in (
        ("access_token", token, MAX_TOKEN_BYTES, True),
        ("audience", audience, MAX_AUDIENCE_BYTES, False),
    ):
        if not value:
            if required:
                fields.append(name)
        elif (
            len(value) > limit
            # Only non-ASCII text has more bytes than characters.
            or (not value.isascii() and len(value.encode("utf-8", "surrogatepass")) > limit)
            or "\x00" in value
        ):
            fields.append(name)
    if len(required_scopes) > MAX_SCOPES:
        fields.append("required_scopes")
    else:
        for i, scope in enumerate(required_scopes):
            if len(scope) > MAX_SCOPE_BYTES or SCOPE_TOKEN_RE.fullmatch(scope) is None:
                fields.append(f"required_scopes[{i}]")
    if fields:
        raise AuthServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            f"invalid request field(s): {', '.join(fields)}",
            fields=tuple(fields),
        )


def _b64decode(segment: str) -> bytes:
    # Strict and canonical base64url, as the server: a token has exactly one spelling. The
    # characters are checked first, then the unused low bits of a last partial group (zero
    # in the one spelling), so the decoding itself cannot fail.
    if _SEGMENT_RE.fullmatch(segment) is None:
        raise Rejected("MALFORMED")
    tail = len(segment) % 4
    if tail == 1 or (tail and _B64URL_ALPHABET.index(segment[-1]) & _UNUSED_BITS[tail]):
        raise Rejected("MALFORMED")
    return binascii.a2b_base64(
        segment.encode("ascii").translate(_TO_STANDARD_B64) + b"=="[: -tail % 4]
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Rejected("MALFORMED") from None
    if not isinstance(value, dict):
        raise Rejected("MALFORMED")
    return value


# The last second a protobuf Timestamp (Validate's expires_at) and a datetime can hold:
# 9999-12-31T23:59:59Z.
_MAX_TIMESTAMP = 253_402_300_799


def _is_timestamp(value: object) -> bool:
    """A NumericDate this checker and authsvc's answer can hold: a number (not a bool) from
    the epoch to `_MAX_TIMESTAMP`. NaN compares false with everything (an `exp` of NaN would
    never expire), and a larger or negative one cannot become the answer's Timestamp."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 <= value <= _MAX_TIMESTAMP
    )


def _ecdsa_numbers(
    signature: bytes, public_key: ec.EllipticCurvePublicKey
) -> tuple[int, int] | None:
    """(r, s) of a JWS ECDSA signature (r ‖ s) in its one accepted spelling, else None:
    0 < r < n and 0 < s <= n/2 (low s), as the server signs (the other algorithms'
    libraries already allow one encoding only: RSA needs s < n at the modulus' length,
    Ed25519 S < L). A curve with no known order has no accepted spelling."""
    order = ECDSA_CURVE_ORDERS.get(public_key.curve.name)
    size = (public_key.curve.key_size + 7) // 8
    if order is None or len(signature) != 2 * size:
        return None
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    return (r, s) if 0 < r < order and 0 < s <= order // 2 else None


@functools.cache
def _ecdsa(alg: str) -> ec.ECDSA:
    # pyjwt's hash for the algorithm, made once (its ECAlgorithm.verify makes one a call).
    hash_alg = _ALGORITHMS[alg].hash_alg  # type: ignore[attr-defined]
    return ec.ECDSA(hash_alg())


def signature_verifies(signing_input: bytes, signature: bytes, key: VerificationKey) -> bool:
    """Whether `signature` (as a JWS carries it) is `key`'s over `signing_input`, in its one
    accepted spelling (`_ecdsa_numbers`). ECDSA goes to `cryptography` directly, from the
    numbers the spelling check read (what pyjwt's ECAlgorithm.verify does, without
    decoding them again); the other algorithms through pyjwt."""
    public_key = key.public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = _ecdsa_numbers(signature, public_key)
        if numbers is None:
            return False
        try:
            public_key.verify(encode_dss_signature(*numbers), signing_input, _ecdsa(key.alg))
        except InvalidSignature:
            return False
        return True
    return _ALGORITHMS[key.alg].verify(signing_input, public_key, signature)


def claim_audiences(claims: dict[str, Any]) -> tuple[str, ...]:
    """The `aud` claim as a tuple (a string or a non-empty list of strings); MALFORMED
    otherwise."""
    aud = claims.get("aud")
    if isinstance(aud, str) and aud:
        return (aud,)
    if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise Rejected("MALFORMED")


def _check_required(claims: dict[str, Any]) -> None:
    for name in ("sub", "jti", "sid", "iss"):
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise Rejected("MALFORMED")
    for name in ("exp", "iat"):
        if not _is_timestamp(claims.get(name)):
            raise Rejected("MALFORMED")
    if "nbf" in claims and not _is_timestamp(claims["nbf"]):
        raise Rejected("MALFORMED")
    if not isinstance(claims.get("scope", ""), str):
        raise Rejected("MALFORMED")
    generation = claims.get(GENERATION_CLAIM, 0)
    if (
        not isinstance(generation, int)
        or isinstance(generation, bool)
        or not 0 <= generation <= _MAX_GENERATION
    ):
        raise Rejected("MALFORMED")
    claim_audiences(claims)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _expiry_datetime(expires_at: float) -> datetime:
    # The server sends exp as a Timestamp of int(exp * 1e9) nanoseconds; the client reads it
    # back at microseconds. The same steps give the same datetime; for a whole number of
    # seconds (authsvc's own tokens) they come to the epoch plus that many seconds.
    if type(expires_at) is int:
        return _EPOCH + timedelta(seconds=expires_at)
    ts = Timestamp()
    ts.FromNanoseconds(int(expires_at * 1_000_000_000))
    return ts.ToDatetime(tzinfo=UTC)


@functools.lru_cache(maxsize=64)
def _header(header_b64: str) -> dict[str, Any]:
    # Every token of one key has the same header: decoded once, not once a token (a
    # spelling that fails raises, and is not kept). Read only: the same dict every time.
    return _json_object(_b64decode(header_b64))


def verified_claims(
    token: str, key_for: Callable[[object], VerificationKey | None], issuer: str
) -> tuple[str, dict[str, Any]]:
    """The key id and the claims of a token whose spelling, signature and claims pass (not
    lifetime, revocation, audience or scope); raises Rejected with the first problem.
    `key_for` gives the key an (untrusted) `kid` header names, or None: the checks authsvc's
    Validate runs too, with its key ring."""
    parts = token.split(".")
    if len(parts) != 3:
        raise Rejected("MALFORMED")
    header_b64, payload_b64, signature_b64 = parts
    if _SEGMENT_RE.fullmatch(payload_b64) is None:
        # Checked before the signature: the signing input must be ASCII.
        raise Rejected("MALFORMED")
    header = _header(header_b64)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
        raise Rejected("MALFORMED")
    # Keys are never taken from the token: such headers mark a forgery attempt.
    if any(name in header for name in _FORBIDDEN_HEADERS):
        raise Rejected("MALFORMED")
    kid = header.get("kid")
    key = key_for(kid)
    if key is None:
        if isinstance(kid, str) and _KID_RE.fullmatch(kid) is not None:
            raise Rejected("BAD_SIGNATURE", unknown_kid=True, kid=kid)
        raise Rejected("BAD_SIGNATURE")
    # The algorithm is the key's, never the header's choice (no `none`, HMAC or confusion).
    if header.get("alg") != key.alg:
        raise Rejected("BAD_SIGNATURE")
    signature = _b64decode(signature_b64)
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    if not signature_verifies(signing_input, signature, key):
        raise Rejected("BAD_SIGNATURE")
    claims = _json_object(_b64decode(payload_b64))
    _check_required(claims)
    if claims["iss"] != issuer:
        raise Rejected("MALFORMED", wrong_issuer=True)
    return str(kid), claims  # a str: only a str names a key


def lifetime_problem(
    now: float,
    *,
    expires_at: float,
    issued_at: float,
    not_before: float | None,
    leeway: float,
) -> str | None:
    """EXPIRED or NOT_YET_VALID against the clock with `leeway` (at least
    START_LEEWAY_SECONDS for iat and nbf), or None."""
    if now >= expires_at + leeway:
        return "EXPIRED"
    latest_start = now + max(leeway, START_LEEWAY_SECONDS)
    if issued_at > latest_start or (not_before or 0) > latest_start:
        return "NOT_YET_VALID"
    return None


def verify_signed(token: str, keys: KeySet, issuer: str) -> VerifiedClaims:
    """Signature and claims (not lifetime, revocation, audience or scope), in the server's
    order; raises Rejected with the first problem."""
    kid, claims = verified_claims(token, keys.get, issuer)
    scopes = tuple(claims.get("scope", "").split())
    accepted = Checked(
        Validation(
            valid=True,
            error=None,
            subject=claims["sub"],
            session_id=claims["sid"],
            scopes=scopes,
            expires_at=_expiry_datetime(claims["exp"]),
            token_id=claims["jti"],
        )
    )
    return VerifiedClaims(
        kid=kid,
        subject=claims["sub"],
        session_id=claims["sid"],
        token_id=claims["jti"],
        scopes=scopes,
        audiences=claim_audiences(claims),
        issued_at=claims["iat"],
        expires_at=claims["exp"],
        not_before=claims.get("nbf"),
        generation=claims.get(GENERATION_CLAIM, 0),
        accepted=accepted,
    )


ClaimsT = TypeVar("ClaimsT")


class VerifiedTokenCache(Generic[ClaimsT]):
    """A bounded map from a token's digest to the claims its verification gave, the least
    recently used evicted first: a hit skips base64, JSON and the signature, never the
    checks after them. TokenChecker keeps one, and so does authsvc's own Validate."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, ClaimsT] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(token: str) -> bytes:
        # A 16-byte digest instead of the token text keeps 100k entries small.
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes) -> ClaimsT | None:
        claims = self._entries.get(key)
        if claims is None:
            self.misses += 1
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        return claims

    def put(self, key: bytes, claims: ClaimsT) -> None:
        if self._max_entries <= 0:
            return
        self._entries[key] = claims
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def discard_if(self, stale: Callable[[ClaimsT], bool]) -> None:
        """Drop the entries `stale` is true of (those of a key no longer listed)."""
        for key in [k for k, claims in self._entries.items() if stale(claims)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class TokenChecker:
    """The whole of Validate's verdict from given keys and revocations, with a bounded LRU
    of tokens whose signature verified (a hit skips base64, JSON and the signature, never
    the lifetime, revocation, audience and scope checks, and only while its key is listed).
    """

    def __init__(
        self,
        *,
        issuer: str,
        leeway: float,
        clock: Callable[[], float],
        cache_size: int,
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(
                f"leeway must be within 0..{MAX_LEEWAY_SECONDS} s (authsvc's AUTH_LEEWAY range)"
            )
        self.issuer = issuer
        self._leeway = leeway
        self._clock = clock
        self._cache: VerifiedTokenCache[VerifiedClaims] = VerifiedTokenCache(cache_size)
        self.keys: KeySet | None = None
        self.revocations = Revocations()

    def set_keys(self, keys: KeySet) -> None:
        self.keys = keys
        # Entries of keys no longer listed would be refused on a hit anyway; drop them now.
        if self._cache:
            kids = keys.kids
            self._cache.discard_if(lambda claims: claims.kid not in kids)

    def signed(self, token: str) -> VerifiedClaims:
        keys = self.keys
        if keys is None:
            raise Rejected("BAD_SIGNATURE")
        digest = self._cache.key(token)
        claims = self._cache.get(digest)
        # The key check too: only the keys listed now may vouch for a token.
        if claims is not None and keys.get(claims.kid) is not None:
            return claims
        claims = verify_signed(token, keys, self.issuer)
        self._cache.put(digest, claims)
        return claims

    def check(self, token: str, required_scopes: Sequence[str], audience: str) -> Checked:
        """Validate's answer (the request's limits are checked by the caller)."""
        try:
            claims = self.signed(token)
            problem = lifetime_problem(
                self._clock(),
                expires_at=claims.expires_at,
                issued_at=claims.issued_at,
                not_before=claims.not_before,
                leeway=self._leeway,
            )
            if problem is not None:
                raise Rejected(problem)
            if self.revocations.is_revoked(claims):
                raise Rejected("REVOKED")
            if audience and audience not in claims.audiences:
                raise Rejected("WRONG_AUDIENCE")
            if required_scopes and not set(required_scopes) <= set(claims.scopes):
                raise Rejected("INSUFFICIENT_SCOPE")
        except Rejected as rejected:
            return Checked(
                invalid(rejected.reason),
                unknown_kid=rejected.unknown_kid,
                wrong_issuer=rejected.wrong_issuer,
            )
        return claims.accepted

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses


def invalid(reason: str) -> Validation:
    return Validation(
        valid=False,
        error=reason,
        subject="",
        session_id="",
        scopes=(),
        expires_at=None,
        token_id="",
    )
