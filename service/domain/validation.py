"""Validate: is an access token good, for this audience and these scopes? The hot path:
CPU only, no database round trip (revocations come from the in-memory state, and a token
verified before skips the signature check, never the others)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from authsvc_client.token_check import VerifiedTokenCache

from service.domain.access_tokens import AccessClaims, AccessTokenCodec, TokenProblem, TokenRejected
from service.domain.keys import KeyRing
from service.domain.revocation import RevocationState
from service.domain.signing_keys import SigningKeys

CallerTokenState = Literal["none", "invalid", "expired", "revoked", "live"]


@dataclass(frozen=True, slots=True)
class Validation:
    """The verdict on an access token: claims when valid, else the problem."""

    claims: AccessClaims | None
    problem: TokenProblem | None
    unknown_kid: str | None = None
    """The token names a key this process has not loaded (see `validate_with_new_keys`)."""


@dataclass(frozen=True, slots=True)
class CallerToken:
    """The access token a caller presented (to Revoke by session or subject), as verified."""

    state: CallerTokenState
    claims: AccessClaims | None = None
    """Set when its signature verified (live, expired or revoked)."""

    @property
    def live_subject(self) -> str | None:
        return self.claims.subject if self.state == "live" and self.claims else None


class AccessTokenValidator:
    """Checks access tokens against the keys, the clock and the revocation state."""

    def __init__(
        self,
        *,
        codec: AccessTokenCodec,
        cache: VerifiedTokenCache[AccessClaims],
        revocations: RevocationState,
        signing_keys: SigningKeys,
    ) -> None:
        self._codec = codec
        self._cache = cache
        self._revocations = revocations
        self._signing_keys = signing_keys
        self._cached_under: KeyRing | None = None
        """The key ring the cache's entries were verified under."""

    def validate(
        self, access_token: str, *, required_scopes: tuple[str, ...], audience: str | None
    ) -> Validation:
        """The hot path: CPU only, no awaits, no database."""
        try:
            claims = self._verified(access_token)
        except TokenRejected as rejected:
            return Validation(
                claims=None, problem=rejected.problem, unknown_kid=rejected.unknown_kid
            )
        if audience and audience not in claims.audiences:
            return Validation(claims=None, problem=TokenProblem.WRONG_AUDIENCE)
        if not set(required_scopes) <= set(claims.scopes):
            return Validation(claims=None, problem=TokenProblem.INSUFFICIENT_SCOPE)
        return Validation(claims=claims, problem=None)

    async def validate_with_new_keys(
        self, access_token: str, *, required_scopes: tuple[str, ...], audience: str | None
    ) -> Validation:
        """`validate`, except that a token naming a key this process has not loaded yet (one
        rotated in on another replica a moment ago, whose log row has not reached us yet) makes
        it look for new keys once, rate-limited, before answering."""
        result = self.validate(access_token, required_scopes=required_scopes, audience=audience)
        if await self._found_new_key(result.unknown_kid):
            result = self.validate(access_token, required_scopes=required_scopes, audience=audience)
        return result

    async def signed_claims(self, access_token: str) -> AccessClaims:
        """The claims of a token whose signature verifies, expired or revoked alike
        (TokenRejected otherwise); new keys are looked for as by `validate_with_new_keys`."""
        return await self._with_new_keys(lambda: self._codec.verify(access_token, check_time=False))

    async def caller_token(self, caller_token: str | None) -> CallerToken:
        """What a caller's access token is: live, revoked, expired, invalid or none."""
        if not caller_token:
            return CallerToken("none")
        try:
            claims = await self._with_new_keys(lambda: self._signed(caller_token))
        except TokenRejected:
            return CallerToken("invalid")
        try:
            self._codec.check_lifetime(claims)
        except TokenRejected:
            return CallerToken("expired", claims)
        if self._revocations.is_token_revoked(claims):
            return CallerToken("revoked", claims)
        return CallerToken("live", claims)

    def _verified(self, access_token: str) -> AccessClaims:
        """Signature, claims, lifetime and revocation: all but audience and scope."""
        claims = self._signed(access_token)
        self._codec.check_lifetime(claims)
        if self._revocations.is_token_revoked(claims):
            raise TokenRejected(TokenProblem.REVOKED)
        return claims

    def _signed(self, access_token: str) -> AccessClaims:
        """Signature and claims, from the cache when verified before; lifetime unchecked."""
        ring = self._signing_keys.ring
        if ring is not self._cached_under:
            # The keys changed: an entry may be of a key no longer listed (retired), whose
            # tokens must fail the signature check, not be answered from the cache.
            self._cache.clear()
            self._cached_under = ring
        key = self._cache.key(access_token)
        claims = self._cache.get(key)
        if claims is None:
            claims = self._codec.verify(access_token, check_time=False)
            self._cache.put(key, claims)
        return claims

    async def _with_new_keys(self, verify: Callable[[], AccessClaims]) -> AccessClaims:
        """`verify()`, tried again once if it named a key this process has not loaded yet
        and looking for new keys found it."""
        try:
            return verify()
        except TokenRejected as rejected:
            if not await self._found_new_key(rejected.unknown_kid):
                raise
        return verify()

    async def _found_new_key(self, unknown_kid: str | None) -> bool:
        """Whether a key this process had not loaded is loaded now (after one look)."""
        if unknown_kid is None:
            return False
        return await self._signing_keys.look_for(unknown_kid)
