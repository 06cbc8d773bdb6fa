"""Which services may call Validate and the admin API (`AUTH_CALLER_AUTH`).

End users call Issue, Refresh, Revoke and GetJwks from anywhere; those stay open. Two
groups can be closed to all but known services:

- `validate`: AuthService/Validate, so a random process on the network cannot test
  stolen or guessed tokens against us;
- `admin`: every AdminService method.

A known service is a line of `AUTH_SERVICE_TOKENS_FILE`:

    # name       groups           credential
    orders       validate         token:<a secret of 32+ characters>
    billing      validate         sha256:<hex SHA-256 of the secret>
    ops-console  admin,validate   cert:ops.internal

It proves itself with `authorization: Bearer <secret>` metadata (compared as SHA-256
digests in constant time, against every entry), or with a client certificate whose
common name or a subject alternative name is the `cert:` name (mutual TLS: needs
`AUTH_TLS_CLIENT_CA`).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.api.status import to_status
from service.api.wire import Context, bearer_credential
from service.domain.events import LogRateLimiter, peer_address
from service.errors import AuthError, ServiceCredentialsRequired, ServiceNotPermitted
from service.settings import CALL_GROUPS, SettingsError

log = logging.getLogger(__name__)

VALIDATE_METHOD = "/auth.v1.AuthService/Validate"
ADMIN_PREFIX = "/auth.v1.AdminService/"
MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 1024  # of a presented secret; longer ones are no secret of ours
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

_calling_service: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "calling_service", default=None
)


def calling_service(_context: Context) -> str | None:
    """The name of the known service making the current call (None if the call's group
    is not guarded)."""
    return _calling_service.get()


def call_group(method: str) -> str | None:
    """The guarded group a full method name belongs to, if any."""
    if method == VALIDATE_METHOD:
        return "validate"
    if method.startswith(ADMIN_PREFIX):
        return "admin"
    return None


@dataclass(frozen=True, slots=True)
class KnownService:
    name: str
    groups: frozenset[str]
    token_digest: bytes | None = None
    certificate_name: str | None = None


class ServiceDirectory:
    """The known services, read once at start."""

    def __init__(self, services: list[KnownService]) -> None:
        self._services = services
        self._token_services = [s for s in services if s.token_digest is not None]
        self._by_certificate = {
            s.certificate_name: s for s in services if s.certificate_name is not None
        }

    @classmethod
    def from_file(cls, path: Path) -> ServiceDirectory:
        """Parse the file; a bad line stops start-up with a message naming the line (never
        the secret on it)."""
        services: list[KnownService] = []
        names: set[str] = set()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"AUTH_SERVICE_TOKENS_FILE: cannot read it ({exc})") from None
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                service = _parse_line(fields)
            except ValueError as exc:
                raise SettingsError(f"AUTH_SERVICE_TOKENS_FILE: line {number}: {exc}") from None
            if service.name in names:
                raise SettingsError(
                    f"AUTH_SERVICE_TOKENS_FILE: line {number}: {service.name} is listed twice"
                )
            names.add(service.name)
            services.append(service)
        return cls(services)

    def by_token(self, token: str) -> KnownService | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        # Every entry is compared, so the time taken says nothing about which one matched.
        for service in self._token_services:
            assert service.token_digest is not None
            if hmac.compare_digest(digest, service.token_digest):
                found = service
        return found

    def by_certificate(self, names: list[str]) -> KnownService | None:
        for name in names:
            service = self._by_certificate.get(name)
            if service is not None:
                return service
        return None

    def __len__(self) -> int:
        return len(self._services)


def _parse_line(fields: list[str]) -> KnownService:
    if len(fields) != 3:
        raise ValueError("expected: NAME GROUPS CREDENTIAL")
    name, groups_text, credential = fields
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError("the name must be letters, digits, '.', '_', ':' or '-'")
    groups = frozenset(groups_text.split(","))
    if not groups <= set(CALL_GROUPS):
        raise ValueError(f"groups must be among {', '.join(CALL_GROUPS)}")
    kind, _, value = credential.partition(":")
    if kind == "token":
        if len(value) < MIN_SECRET_LENGTH:
            raise ValueError(f"a token must be at least {MIN_SECRET_LENGTH} characters")
        return KnownService(name, groups, token_digest=hashlib.sha256(value.encode()).digest())
    if kind == "sha256":
        if _HEX_DIGEST_RE.fullmatch(value) is None:
            raise ValueError("sha256: needs 64 lowercase hex digits")
        return KnownService(name, groups, token_digest=bytes.fromhex(value))
    if kind == "cert":
        if not value:
            raise ValueError("cert: needs the certificate's name")
        return KnownService(name, groups, certificate_name=value)
    raise ValueError("the credential must start with token:, sha256: or cert:")


def _certificate_names(context: Context) -> list[str]:
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names.extend(v.decode("utf-8", "replace") for v in auth.get(key, ()))
    return names


Behavior = Callable[[Any, Context], Awaitable[Any]]


class CallerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses guarded calls from unknown services before the method runs (for a
    server-streaming method, before its first response); a guarded method of any other
    kind is not served at all."""

    def __init__(
        self,
        *,
        directory: ServiceDirectory,
        guarded: frozenset[str],
        on_admin_refused: Callable[[str, str, str | None, str | None], Awaitable[None]]
        | None = None,
        log_window: float = 300.0,
    ) -> None:
        self._directory = directory
        self._guarded = guarded
        # A refusal costs its sender next to nothing: one line per source and window.
        self._limited_log = LogRateLimiter(log, window=log_window, now=time.monotonic)
        # (method, reason, peer, known service or None) of refused admin calls, recorded as
        # security events.
        self._on_admin_refused = on_admin_refused
        # grpc.aio asks the interceptors on every call: wrap each method's handler once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        group = call_group(method)
        if handler is None or group not in self._guarded:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            guarded_handler: grpc.RpcMethodHandler[Any, Any] | None = cached[1]
            return guarded_handler
        behavior: Any = handler.unary_unary or handler.unary_stream
        if handler.request_streaming or not (
            inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        ):
            # Unary requests are checked before the handler runs; any other kind of
            # handler is refused (UNIMPLEMENTED) rather than served unguarded.
            log.error("%s cannot be guarded; caller authentication refuses to serve it", method)
            return None
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        guarded = (
            self._guard_streamed(behavior, group, method)
            if inspect.isasyncgenfunction(behavior)
            else self._guard(behavior, group, method)
        )
        guarded_handler = make(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, guarded_handler)
        return guarded_handler

    async def _admit(self, context: Context, group: str, method: str) -> str:
        """The calling service's name, or the call is aborted."""
        token = bearer_credential(context, max_length=MAX_SECRET_LENGTH)
        service = self._directory.by_token(token) if token is not None else None
        if service is None:
            service = self._directory.by_certificate(_certificate_names(context))
        error: AuthError | None = None
        if service is None:
            error = ServiceCredentialsRequired()
        elif group not in service.groups:
            error = ServiceNotPermitted()
        if error is not None:
            caller = "an unknown caller" if service is None else service.name
            address = peer_address(context.peer())
            self._limited_log.warning(
                (method, error.reason, caller, address),
                "security: %s refused (%s) for %s from %s",
                method,
                error.reason,
                caller,
                address,
            )
            if group == "admin" and self._on_admin_refused is not None:
                await self._on_admin_refused(
                    method,
                    error.reason,
                    context.peer(),
                    None if service is None else service.name,
                )
            await context.abort_with_status(to_status(error))
        assert service is not None
        return service.name

    def _guard(self, behavior: Behavior, group: str, method: str) -> Behavior:
        """A coroutine handler: a unary call, or a stream written through the context."""

        async def guarded(request: Any, context: Context) -> Any:
            reset = _calling_service.set(await self._admit(context, group, method))
            try:
                return await behavior(request, context)
            finally:
                _calling_service.reset(reset)

        return guarded

    def _guard_streamed(
        self, behavior: Callable[[Any, Context], AsyncIterator[Any]], group: str, method: str
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        """An async-generator handler (server streaming): checked before the first response."""

        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            reset = _calling_service.set(await self._admit(context, group, method))
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                _calling_service.reset(reset)

        return guarded
