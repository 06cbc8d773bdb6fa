"""Which services may call Validate and the admin API (`AUTH_CALLER_AUTH`): the known
services of `AUTH_SERVICE_TOKENS_FILE` and how a caller proves it is one of them (a bearer
secret compared as SHA-256 digests in constant time against every entry, or a client
certificate name of exactly the configured kind: `cert:dns:`, `cert:uri:`, `cert:cn:`).
The file's format and the rules: docs/operations.md, "TLS and the services that call authsvc".
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from service.api.status import to_status
from service.api.wire import Context, bearer_credential
from service.api.wrapped_handlers import WrappedHandlers
from service.domain.events import LogRateLimiter, peer_address
from service.errors import AuthError, ServiceCredentialsRequired, ServiceNotPermitted
from service.settings import SettingsError, declaration_of

log = logging.getLogger(__name__)

VALIDATE_METHOD = "/auth.v1.AuthService/Validate"
# Validating tokens in the caller's own process needs what this stream sends: the same
# guard as Validate.
WATCH_REVOCATIONS_METHOD = "/auth.v1.AuthService/WatchRevocations"
ADMIN_PREFIX = "/auth.v1.AdminService/"
MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 1024  # of a presented secret; longer ones are no secret of ours
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Lower-case DNS labels (underscores allowed for internal names), no wildcard.
_DNS_NAME_RE = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_CERT_KINDS_HELP = (
    "cert: needs the kind of name: cert:dns:NAME (a DNS subject alternative name), "
    "cert:uri:URI (a URI one, such as a SPIFFE id) or cert:cn:NAME (the common name); "
    "a bare cert:NAME is refused, since it used to match any name in the certificate"
)

_calling_service: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "calling_service", default=None
)


def calling_service(_context: Context) -> str | None:
    """The name of the known service making the current call (None if the call's group
    is not guarded)."""
    return _calling_service.get()


def call_group(method: str) -> str | None:
    """The guarded group a full method name belongs to, if any."""
    if method in (VALIDATE_METHOD, WATCH_REVOCATIONS_METHOD):
        return "validate"
    if method.startswith(ADMIN_PREFIX):
        return "admin"
    return None


CertificateNameKind = Literal["dns", "uri", "cn"]


@dataclass(frozen=True, slots=True)
class CertificateName:
    """One name of a client certificate, with its kind (DNS names in lower case)."""

    kind: CertificateNameKind
    value: str

    @classmethod
    def of(cls, kind: CertificateNameKind, value: str) -> CertificateName:
        return cls(kind, value.lower() if kind == "dns" else value)


@dataclass(frozen=True, slots=True)
class KnownService:
    name: str
    groups: frozenset[str]
    token_digest: bytes | None = None
    certificate_name: CertificateName | None = None


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
        # One credential names one service: else the caller would be whichever line a
        # lookup met last.
        credentials: dict[bytes | CertificateName, str] = {}
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
            credential = service.token_digest or service.certificate_name
            assert credential is not None
            if credential in credentials:
                raise SettingsError(
                    f"AUTH_SERVICE_TOKENS_FILE: line {number}: the same credential as "
                    f"{credentials[credential]}'s"
                )
            credentials[credential] = service.name
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

    def by_certificate(self, names: Iterable[CertificateName]) -> KnownService | None:
        """The one service a certificate's names designate; None for none, or for a
        certificate that designates two (which one would it be?)."""
        found = {s.name: s for n in names if (s := self._by_certificate.get(n)) is not None}
        if len(found) != 1:
            return None
        (service,) = found.values()
        return service

    def __len__(self) -> int:
        return len(self._services)


def _parse_line(fields: list[str]) -> KnownService:
    if len(fields) != 3:
        raise ValueError("expected: NAME GROUPS CREDENTIAL")
    name, groups_text, credential = fields
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError("the name must be letters, digits, '.', '_', ':' or '-'")
    # Spelt as AUTH_CALLER_AUTH is, read by its parser (its message says what it takes).
    groups: frozenset[str] = declaration_of("AUTH_CALLER_AUTH").parser.parse(groups_text)
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
        return KnownService(name, groups, certificate_name=_parse_certificate_name(value))
    raise ValueError("the credential must start with token:, sha256: or cert:")


def _parse_certificate_name(text: str) -> CertificateName:
    kind, separator, value = text.partition(":")
    if not separator or kind not in ("dns", "uri", "cn"):
        raise ValueError(_CERT_KINDS_HELP)
    if kind == "dns":
        if _DNS_NAME_RE.fullmatch(value.lower()) is None:
            raise ValueError("cert:dns: needs a DNS name (letters, digits, '-', '.'; no '*')")
        return CertificateName.of("dns", value)
    if kind == "uri":
        if _URI_RE.fullmatch(value) is None:
            raise ValueError("cert:uri: needs a URI with its scheme (spiffe://...)")
        return CertificateName.of("uri", value)
    if not value:
        raise ValueError("cert:cn: needs the common name")
    return CertificateName.of("cn", value)


# gRPC's properties of the verified client certificate, by kind of name: only these three
# kinds are ever compared (x509_subject_alternative_name would mix every kind of SAN).
_CERTIFICATE_PROPERTIES: tuple[tuple[str, CertificateNameKind], ...] = (
    ("peer_dns", "dns"),
    ("peer_uri", "uri"),
    ("x509_common_name", "cn"),
)


def _certificate_names(context: Context) -> list[CertificateName]:
    auth = context.auth_context()
    return [
        CertificateName.of(kind, value.decode("utf-8", "replace"))
        for key, kind in _CERTIFICATE_PROPERTIES
        for value in auth.get(key, ())
    ]


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
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or call_group(method) not in self._guarded:
            return handler
        guarded_handler: grpc.RpcMethodHandler[Any, Any] | None = self._wrapped.get(
            method, handler, lambda: self.wrap(method, handler)
        )
        return guarded_handler

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """`handler` guarded if `method` is in a guarded group (else `handler` itself: a
        method with nothing to check costs nothing), or None (cannot be guarded). The layer
        `service.server` applies once, when the method is registered."""
        group = call_group(method)
        if group not in self._guarded:
            return handler
        return self._guarded_handler(handler, group, method)

    def _guarded_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], group: str, method: str
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
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
        return make(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

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
