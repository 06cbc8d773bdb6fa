"""Access tokens: JWTs per RFC 9068, signed with the key ring in force, verified strictly.

Verification parses the token once, checks the signature with the key named by
`kid` and the algorithm pinned to that key (so `none`, HMAC and algorithm
confusion are impossible), then checks each claim, with time from the injected clock.
Those checks are the client package's (authsvc_client.token_check), run with this
service's key ring: one set of rules for Validate and for a caller checking locally.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass

from authsvc_client import token_check
from jwt.algorithms import Algorithm, get_default_algorithms

from service.clock import Clock
from service.domain.jws_signing import EcdsaSigner, TokenIds, compact_json
from service.domain.keys import ACCESS_TOKEN_TYPE, CurrentKeys, SigningKey

TOKEN_TYPE = ACCESS_TOKEN_TYPE
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
# A private claim: the session's generation among its user's (see AccessClaims.generation).
GENERATION_CLAIM = token_check.GENERATION_CLAIM
# iat/nbf may be this far ahead of the clock even with AUTH_LEEWAY=0.
START_LEEWAY_SECONDS = token_check.START_LEEWAY_SECONDS
# Signing writes low-s ECDSA signatures only, the one spelling verification accepts.
ECDSA_CURVE_ORDERS = token_check.ECDSA_CURVE_ORDERS


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
        payload = base64.urlsafe_b64encode(compact_json(claims).encode()).rstrip(b"=")
        signing_input = f"{key.jws_header_b64}.{payload.decode('ascii')}".encode("ascii")
        # ECDSA through its signer (low s: the one spelling verification accepts); a curve
        # without a known order has no low s to write, and signs through pyjwt as others do.
        signer = self._ecdsa_signer(key)
        if signer is not None:
            signature = signer.sign(signing_input)
        else:
            signature = _ALGORITHMS[key.alg].sign(signing_input, key.private_key)
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
        try:
            _, claims = token_check.verified_claims(
                token, self._keys.ring.verification_key, self._issuer
            )
        except token_check.Rejected as rejected:
            # The same reasons, as this service's problem (a wrong `iss` is MALFORMED here:
            # the client's wrong_issuer flag only tells its caller to look at its setting).
            raise TokenRejected(TokenProblem(rejected.reason), unknown_kid=rejected.kid) from None
        verified = AccessClaims(
            subject=claims["sub"],
            session_id=claims["sid"],
            token_id=claims["jti"],
            scopes=tuple(claims.get("scope", "").split()),
            audiences=token_check.claim_audiences(claims),
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
        problem = token_check.lifetime_problem(
            self._clock.now(),
            expires_at=claims.expires_at,
            issued_at=claims.issued_at,
            not_before=claims.not_before,
            leeway=self._leeway,
        )
        if problem is not None:
            raise TokenRejected(TokenProblem(problem))
