"""An async Python client for auth.v1.AuthService with deadlines, retries and typed results.

    async with AuthClient(target="authsvc:50051") as auth:
        pair = await auth.issue("alice", password)
        check = await auth.validate(pair.access_token, required_scopes=("read",))

Which calls are retried and why, the deadline, the errors: docs/clients.md.
No token or password ever appears in an exception, a repr or a log line of this module.

Several replicas: one HTTP/2 connection carries every call of a channel, so a channel to one
address (or through a TCP balancer) pins all calls to one replica. Give the client every
replica instead, and it spreads calls round-robin over them, dropping a replica from the
rotation while it is unreachable or reports NOT_SERVING on `auth.v1.AuthService` (gRPC
client-side health checking: one health `Watch` stream per replica):

    AuthClient(target=["10.0.0.5:50051", "10.0.0.6:50051"])              # fixed addresses
    AuthClient(target="dns:///authsvc-headless.auth.svc:50051", balance=True)  # all A records

`service_config()` is the same policy as JSON for clients in other languages (with gRPC's own
retryPolicy in place of this module's retry loop); deploy/grpc-service-config.json holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from authsvc_client.channel import (
    NO_RETRY,
    RetryPolicy,
    addresses_target,
    service_config,
)
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger(__name__)

__all__ = [
    "AuthClient",
    "AuthServiceError",
    "Jwks",
    "RetryPolicy",
    "TokenPair",
    "Validation",
    "addresses_target",
    "service_config",
]

DEFAULT_TIMEOUT = 5.0
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_PREFIX = "VALIDATION_ERROR_"

Resp = TypeVar("Resp")


@dataclass(frozen=True)
class TokenPair:
    """What Issue and Refresh return. The tokens are left out of the repr so that logging a
    TokenPair cannot leak them."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime
    session_id: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Validation:
    """Validate's verdict. `error` is the ValidationError name without its prefix
    ("EXPIRED", "REVOKED", "INSUFFICIENT_SCOPE", ...; "UNKNOWN_<n>" for a reason newer than
    this client) and None when valid; the other fields are set only when valid."""

    valid: bool
    error: str | None
    subject: str
    session_id: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    token_id: str


@dataclass(frozen=True)
class Jwks:
    """The JWK Set: the raw JSON text (for a JOSE library) and its parsed keys."""

    json: str
    keys: tuple[Mapping[str, Any], ...]

    def key(self, kid: str) -> Mapping[str, Any] | None:
        """The key with this "kid", if listed."""
        return next((k for k in self.keys if k.get("kid") == kid), None)


class AuthServiceError(Exception):
    """A failed call. `reason` is the ErrorInfo reason (e.g. INVALID_CREDENTIALS), None when
    the failure did not come from authsvc (e.g. the connection failed). `fields` names the
    offending request fields of INVALID_ARGUMENT; `retry_after` is the server's RetryInfo
    delay in seconds (LOGIN_THROTTLED)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str | None,
        message: str,
        *,
        fields: tuple[str, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {reason or '-'}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.fields = fields
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> AuthServiceError:
        """Read the google.rpc.Status details; tolerant of a status without or with
        undecodable details (a proxy or gRPC itself may have answered)."""
        reason: str | None = None
        fields: tuple[str, ...] = ()
        retry_after: float | None = None
        for key, value in error.trailing_metadata() or ():
            if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # a malformed detail must not hide the real error
                log.debug("undecodable grpc-status-details-bin ignored")
                continue
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                bad = error_details_pb2.BadRequest()
                retry = error_details_pb2.RetryInfo()
                # Unpack answers False for a detail of another type.
                if detail.Unpack(info):
                    reason = info.reason or None
                elif detail.Unpack(bad):
                    fields = tuple(v.field for v in bad.field_violations)
                elif detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToMilliseconds() / 1000
        return cls(
            error.code(),
            reason,
            error.details() or "",
            fields=fields,
            retry_after=retry_after,
        )


def _datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _token_pair(pair: auth_pb2.TokenPair) -> TokenPair:
    return TokenPair(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        token_type=pair.token_type,
        access_token_expires_at=_datetime(pair.access_token_expires_at),
        refresh_token_expires_at=_datetime(pair.refresh_token_expires_at),
        session_id=pair.session_id,
        scopes=tuple(pair.scopes),
    )


def _validation(response: auth_pb2.ValidateResponse) -> Validation:
    error = None
    if not response.valid:
        try:
            name = auth_pb2.ValidationError.Name(response.error)
        except ValueError:  # a newer server's reason: still "not valid", never a crash
            name = f"{_ERROR_PREFIX}UNKNOWN_{int(response.error)}"
        error = name.removeprefix(_ERROR_PREFIX)
    return Validation(
        valid=response.valid,
        error=error,
        subject=response.subject,
        session_id=response.session_id,
        scopes=tuple(response.scopes),
        expires_at=_datetime(response.expires_at) if response.HasField("expires_at") else None,
        token_id=response.token_id,
    )


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class AuthClient:
    """An async client for authsvc; one channel, shared by every call.

    Keyword-only configuration:
    - `target`: "host:port" (any gRPC target string), or a list of replicas' IP:PORT
      addresses, called round-robin (see `addresses_target`).
    - `balance`: spread calls round-robin over every address the target resolves to, with
      client-side health checking (a DNS name with one record per replica); on by default
      for a list of addresses, off for a single target string.
    - `credentials`: channel credentials for TLS (`grpc.ssl_channel_credentials(...)`, with a
      client certificate for mTLS); None opens an insecure channel.
    - `service_token`: sent as "authorization: Bearer <token>" on Validate and GetJwks only,
      to authenticate this service to authsvc. Revoke uses the end user's access token in the
      same header, so the service token is never sent there (nor on Issue or Refresh).
    - `timeout`: the default deadline of a call, retries included.
    - `retry`: the UNAVAILABLE retry policy; `retry_refresh=False` turns retries off for
      Refresh (see the module docstring).
    - `options`: extra gRPC channel options.

    The channel is opened on first use, so the client may be built outside an event loop;
    close it with `await client.close()` or use `async with`.
    """

    def __init__(
        self,
        *,
        target: str | Sequence[str],
        balance: bool | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        service_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        retry_refresh: bool = True,
        options: Sequence[tuple[str, Any]] = (),
        rng: random.Random | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if isinstance(target, str):
            self._target = target
        else:
            self._target = addresses_target(target)
            balance = True if balance is None else balance
        self._credentials = credentials
        self._service_metadata = _bearer(service_token) if service_token else ()
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._retry_refresh = retry_refresh
        self._options = tuple(options)
        if balance:
            # One retry loop, this module's: no retryPolicy in the service config as well.
            config = json.dumps(service_config(retry=None))
            self._options = (("grpc.service_config", config), *self._options)
        # Jitter needs no cryptographic randomness; injectable for tests.
        self._rng = rng or random.Random()
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: auth_pb2_grpc.AuthServiceAsyncStub | None = None

    def __repr__(self) -> str:
        # The service token stays out of the repr.
        return f"AuthClient(target={self._target!r}, tls={self._credentials is not None})"

    async def __aenter__(self) -> Self:
        self._stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. A later call reopens it."""
        channel, self._channel, self._stub_instance = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _stub(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        if self._stub_instance is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=self._options
                )
            self._channel = channel
            self._stub_instance = auth_pb2_grpc.AuthServiceStub(channel)
        return self._stub_instance

    async def issue(
        self,
        username: str,
        password: str,
        *,
        scopes: Sequence[str] = (),
        audience: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> TokenPair:
        """Log in; a new session. Never retried (see the module docstring)."""
        request = auth_pb2.IssueRequest(
            password=auth_pb2.PasswordCredentials(username=username, password=password),
            scopes=list(scopes),
            audience=audience,
        )
        response = await self._call(
            "Issue",
            lambda t: self._stub().Issue(request, timeout=t),
            timeout,
            retry=NO_RETRY,
        )
        return _token_pair(response.tokens)

    async def refresh(
        self,
        refresh_token: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> TokenPair:
        """Rotate a refresh token; the new pair replaces the old one."""
        request = auth_pb2.RefreshRequest(refresh_token=refresh_token)
        response = await self._call(
            "Refresh",
            lambda t: self._stub().Refresh(request, timeout=t),
            timeout,
            retry=self._retry if self._retry_refresh else NO_RETRY,
        )
        return _token_pair(response.tokens)

    async def validate(
        self,
        access_token: str,
        *,
        required_scopes: Sequence[str] = (),
        audience: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> Validation:
        """Check an access token. A bad token is a Validation with valid=False, not an
        exception; only an empty or oversized token raises (INVALID_ARGUMENT)."""
        request = auth_pb2.ValidateRequest(
            access_token=access_token, required_scopes=list(required_scopes), audience=audience
        )
        response = await self._call(
            "Validate",
            lambda t: self._stub().Validate(request, timeout=t, metadata=self._service_metadata),
            timeout,
        )
        return _validation(response)

    async def revoke(
        self,
        *,
        refresh_token: str | None = None,
        access_token: str | None = None,
        session_id: str | None = None,
        subject: str | None = None,
        caller_token: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> int:
        """Revoke sessions; exactly one target. Returns how many sessions this call revoked.
        By `refresh_token` or `access_token`: 0 when already revoked or unknown. By
        `session_id` or `subject`: needs `caller_token`, a live access token of the same
        subject, and fails with CALLER_UNAUTHENTICATED unless it ends a live session (also
        when a retry finds the session already ended by the first attempt). By `subject`
        the count stops at 10000: that answer means at least 10000 (the response's
        `revoked_sessions_is_lower_bound`)."""
        targets = {
            "refresh_token": refresh_token,
            "access_token": access_token,
            "session_id": session_id,
            "subject": subject,
        }
        given = {name: value for name, value in targets.items() if value is not None}
        if len(given) != 1:
            raise ValueError("revoke needs exactly one target")
        request = auth_pb2.RevokeRequest(**given)
        metadata = _bearer(caller_token) if caller_token else ()
        response = await self._call(
            "Revoke",
            lambda t: self._stub().Revoke(request, timeout=t, metadata=metadata),
            timeout,
        )
        return response.revoked_sessions

    async def get_jwks(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> Jwks:
        """The public keys that verify access tokens offline."""
        response = await self._call(
            "GetJwks",
            lambda t: self._stub().GetJwks(
                auth_pb2.GetJwksRequest(), timeout=t, metadata=self._service_metadata
            ),
            timeout,
        )
        parsed = json.loads(response.jwks_json)
        return Jwks(json=response.jwks_json, keys=tuple(parsed.get("keys", ())))

    def watch_revocations(
        self, after_sequence: int = 0
    ) -> grpc.aio.UnaryStreamCall[auth_pb2.WatchRevocationsRequest, auth_pb2.RevocationUpdate]:
        """The WatchRevocations stream from `after_sequence` (0: a snapshot first), with the
        service token; no deadline and no retry (`LocalValidator` follows and resumes it)."""
        return self._stub().WatchRevocations(
            auth_pb2.WatchRevocationsRequest(after_sequence=after_sequence),
            metadata=self._service_metadata,
        )

    async def _call(
        self,
        method: str,
        attempt_call: Callable[[float], Awaitable[Resp]],
        timeout: float | None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        *,
        retry: RetryPolicy | None = None,
    ) -> Resp:
        """Run `attempt_call(remaining_seconds)` until it succeeds, fails with a code other
        than UNAVAILABLE, runs out of attempts, or the next backoff would pass the deadline."""
        policy = retry or self._retry
        budget = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempt = 1
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await attempt_call(max(remaining, 0.001))
            except grpc.aio.AioRpcError as rpc_error:
                error = AuthServiceError.from_rpc_error(rpc_error)
            if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= policy.max_attempts:
                raise error
            pause = policy.backoff(attempt, self._rng)
            if time.monotonic() + pause >= deadline:
                raise error
            log.info(
                "authsvc %s: UNAVAILABLE (%s), retry %d in %.3f s",
                method,
                error.reason or "transport",
                attempt,
                pause,
            )
            await asyncio.sleep(pause)
            attempt += 1
