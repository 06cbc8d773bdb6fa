"""A grpc.aio server interceptor that requires an authsvc access token on chosen methods.

    auth = AuthClient(target="authsvc:50051", service_token=...)
    guard = RequireAccessToken(auth, {
        "/example.Orders/Create": ("orders:write",),   # a valid token with this scope
        "/example.Orders/List": (),                      # any valid token
    }, audience="orders")
    server = grpc.aio.server(interceptors=[guard])
    ...
    await guard.close()

Methods not in the map pass through untouched; handlers read the caller with
`current_principal()`. Tokens are checked in this process by a `LocalValidator`
(revocations and keys pushed by authsvc; authsvc's Validate while it is stale, or always
against an authsvc that does not serve WatchRevocations), or by authsvc's Validate on every
call with `remote_validate=True`. The statuses it answers: docs/clients.md.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc

from authsvc_client.client import AuthClient, AuthServiceError, Validation
from authsvc_client.limited_log import LogRateLimiter
from authsvc_client.local_validator import LocalValidator
from authsvc_client.token_check import MAX_TOKEN_BYTES

log = logging.getLogger(__name__)

__all__ = ["Principal", "RequireAccessToken", "current_principal"]

# Codes from authsvc that mean "cannot tell right now", not "your token is bad".
_UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # grpc's RpcMethodHandler is generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


@dataclass(frozen=True)
class Principal:
    """Who called: the validated access token's claims."""

    subject: str
    scopes: frozenset[str]
    session_id: str
    token_id: str
    expires_at: float  # seconds since the epoch


_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("authsvc_principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled, validated by `RequireAccessToken`.

    grpc.aio runs each RPC (interceptors and handler) in its own contextvars.Context, so
    this is per call. Raises LookupError in a method the interceptor does not protect.
    """
    try:
        return _principal.get()
    except LookupError:
        raise LookupError(
            "no principal: this method is not protected by RequireAccessToken"
        ) from None


def _bearer_token(context: Context) -> str | None:
    """The token of the first "authorization" header if it is "Bearer <token>"."""
    for key, value in context.invocation_metadata() or ():
        if key != "authorization":
            continue
        if not isinstance(value, str):
            return None
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return token
    return None


def _is_async(behavior: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class RequireAccessToken(grpc.aio.ServerInterceptor):
    """Requires a valid authsvc access token on the methods in `required_scopes`.

    - `auth`: the AuthClient that reaches authsvc (give it the service token if authsvc
      requires one): the stream of revocations and the fallback Validate go through it.
    - `required_scopes`: full method name ("/package.Service/Method") → scopes the token must
      all carry (empty: any valid token). Other methods are not touched.
    - `audience`: if set, the token's "aud" must contain it.
    - `validator`: the LocalValidator to check tokens with (its owner starts and closes
      it); by default one is built on `auth` (with `issuer`, `leeway`, `max_staleness`),
      started on the first protected call and closed by `close()`.
    - `remote_validate`: ask authsvc's Validate on every call instead (no local checks).
    - `clock`: seconds since the epoch, for the token's exp/iat/nbf; injectable for tests.
    - `validate_timeout`: the longest wait for authsvc, further capped by the call's deadline.
    """

    def __init__(
        self,
        auth: AuthClient,
        required_scopes: Mapping[str, Sequence[str]],
        *,
        audience: str = "",
        validator: LocalValidator | None = None,
        remote_validate: bool = False,
        issuer: str = "authsvc",
        leeway: float = 0.0,
        max_staleness: float = 5.0,
        clock: Callable[[], float] = time.time,
        validate_timeout: float = 2.0,
    ) -> None:
        if validator is not None and remote_validate:
            raise ValueError("give a validator or remote_validate, not both")
        self._auth = auth
        self._required = {method: tuple(scopes) for method, scopes in required_scopes.items()}
        self._audience = audience
        self._owns_validator = validator is None and not remote_validate
        if self._owns_validator:
            validator = LocalValidator.from_client(
                auth,
                audience=audience,
                issuer=issuer,
                leeway=leeway,
                max_staleness=max_staleness,
                clock=clock,
                validate_timeout=validate_timeout,
            )
        self.validator = validator
        """The LocalValidator in use (None with `remote_validate`): its metrics."""
        self._validate_timeout = validate_timeout
        # Any caller can make us ask authsvc: while it is down or refuses us, one line per
        # cause a minute, not one per call.
        self._limited_log = LogRateLimiter(log, window=60.0, now=time.monotonic)

    async def close(self) -> None:
        """Stop the LocalValidator this interceptor built (not one it was given)."""
        if self._owns_validator and self.validator is not None:
            await self.validator.close()

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        scopes = self._required.get(handler_call_details.method)
        if handler is None or scopes is None:
            return handler
        return self._wrap(handler, handler_call_details.method, scopes)

    def _wrap(self, handler: Handler, method: str, scopes: tuple[str, ...]) -> Handler:
        """The same handler with the check run first, inside the call (where `context` is)."""
        if handler.request_streaming and handler.response_streaming:
            behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        if behavior is None:  # a malformed handler: refuse to serve it rather than pass it on
            raise TypeError(f"{method}: the method handler has no behavior")
        inner: Callable[..., Any] = behavior

        if not _is_async(inner):
            # Fail closed: a sync handler would need grpc's own sync context, which an
            # interceptor cannot build; running it unchecked is not an option.
            log.error("%s has a synchronous handler; RequireAccessToken refuses it", method)

            async def refuse(request: Any, context: Context) -> NoReturn:
                await context.abort(grpc.StatusCode.INTERNAL, "handler misconfigured")

            wrapped: Callable[..., Any] = refuse
        elif inspect.isasyncgenfunction(inner):

            async def checked_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                # No reset: the RPC's own Context ends with it, and a generator may be closed
                # from another context, where reset would fail.
                _principal.set(await self._authorize(context, scopes))
                async for item in inner(request, context):
                    yield item

            wrapped = checked_stream
        else:

            async def checked(request: Any, context: Context) -> Any:
                token = _principal.set(await self._authorize(context, scopes))
                try:
                    return await inner(request, context)
                finally:
                    _principal.reset(token)

            wrapped = checked

        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _authorize(self, context: Context, scopes: tuple[str, ...]) -> Principal:
        """The caller's Principal, or the call is aborted (abort raises)."""
        token = _bearer_token(context)
        if token is None:
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, "missing bearer access token")
        if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, "invalid access token")
        answer = await self._check(context, token, scopes)
        if answer.error == "INSUFFICIENT_SCOPE":
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, "insufficient scope")
        if answer.error == "VERIFIER_STALE":
            # Only a fail_closed validator answers this: it cannot tell, the caller may retry.
            await _deny(context, grpc.StatusCode.UNAVAILABLE, "authentication unavailable")
        if not answer.valid or answer.expires_at is None:
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, "invalid access token")
        return Principal(
            subject=answer.subject,
            scopes=frozenset(answer.scopes),
            session_id=answer.session_id,
            token_id=answer.token_id,
            expires_at=answer.expires_at.timestamp(),
        )

    async def _check(self, context: Context, token: str, scopes: tuple[str, ...]) -> Validation:
        """The verdict: from the LocalValidator (which asks authsvc itself when stale) or
        from authsvc's Validate; the call is aborted when neither can answer."""
        timeout = self._validate_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining))
        try:
            if self.validator is None:
                return await self._auth.validate(
                    token, required_scopes=scopes, audience=self._audience, timeout=timeout
                )
            if self._owns_validator:
                self.validator.start_in_background()
            return await self.validator.validate_async(
                token, scopes, self._audience, timeout=timeout
            )
        except AuthServiceError as error:
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, "invalid access token")
            if error.code in _UNAVAILABLE_CODES:
                self._limited_log.warning(
                    ("failed", error.code.name, error.reason),
                    "authsvc Validate failed: %s/%s",
                    error.code.name,
                    error.reason,
                )
                await _deny(context, grpc.StatusCode.UNAVAILABLE, "authentication unavailable")
            # UNAUTHENTICATED/PERMISSION_DENIED from authsvc concern *this* service's own
            # credentials, not the caller's token: a misconfiguration, not the caller's fault.
            self._limited_log.error(
                ("refused", error.code.name, error.reason),
                "authsvc Validate refused: %s/%s",
                error.code.name,
                error.reason,
            )
            await _deny(context, grpc.StatusCode.INTERNAL, "authentication misconfigured")


async def _deny(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    # Fixed texts only: nothing from the token or authsvc's answer reaches the caller.
    await context.abort(code, details)
