"""Domain errors: one root, each class carrying its gRPC status code and ErrorInfo reason.

The domain raises these; `service.api.status` is the one place that turns them
into gRPC statuses. Messages are fixed strings chosen here, never built from
client input, so no token or password can leak through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ERROR_DOMAIN = "authsvc"

# gRPC status code names. The domain names them but imports no gRPC: the adapter
# turns the name into grpc.StatusCode.
StatusName = Literal[
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "ALREADY_EXISTS",
    "NOT_FOUND",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "UNKNOWN",
]


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, for google.rpc.BadRequest."""

    field: str
    description: str


class AuthError(Exception):
    """Root of every error the domain reports to a caller."""

    code: StatusName = "UNKNOWN"
    reason: str = "UNKNOWN"
    message: str = "request failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message is not None:
            self.message = message


class InvalidArgument(AuthError):
    """A request field is missing, malformed or over its limit."""

    code: StatusName = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"
    message = "invalid request"

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request field(s): {fields}")


class InvalidCredentials(AuthError):
    """Unknown user, wrong password or disabled user: one answer for all three."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "INVALID_CREDENTIALS"
    message = "invalid username or password"


class ScopeNotAllowed(AuthError):
    """Issue asked for a scope the user does not hold."""

    code: StatusName = "PERMISSION_DENIED"
    reason = "SCOPE_NOT_ALLOWED"
    message = "a requested scope is not allowed for this user"


class LoginThrottled(AuthError):
    """Too many failed logins for this username or address: wait before trying again."""

    code: StatusName = "RESOURCE_EXHAUSTED"
    reason = "LOGIN_THROTTLED"
    message = "too many failed logins; retry later"

    def __init__(self, retry_after: float) -> None:
        super().__init__()
        self.retry_after = retry_after


class RefreshTokenInvalid(AuthError):
    """The refresh token is unknown, malformed or not ours."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "REFRESH_TOKEN_INVALID"
    message = "refresh token is not valid"


class RefreshTokenExpired(AuthError):
    """The refresh token is past its idle or absolute expiry."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "REFRESH_TOKEN_EXPIRED"
    message = "refresh token has expired"


class SessionRevoked(AuthError):
    """The refresh token's session was revoked."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "SESSION_REVOKED"
    message = "session has been revoked"


class RefreshTokenReused(AuthError):
    """An already rotated refresh token came back: the session is now revoked."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "REFRESH_TOKEN_REUSED"
    message = "refresh token was already used; the session has been revoked"


class CallerUnauthenticated(AuthError):
    """Revoke by session or subject refused: no access token, or one that is not live, not
    the owner's, or nothing left to revoke. One answer for all of them, so that Revoke
    cannot tell whoever holds a token whether it is live."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "CALLER_UNAUTHENTICATED"
    message = (
        "this call needs a live access token of the session's or subject's owner in the "
        "authorization metadata, and a session that is not revoked yet"
    )


class UserAlreadyExists(AuthError):
    """A user with that username exists already."""

    code: StatusName = "ALREADY_EXISTS"
    reason = "USER_ALREADY_EXISTS"
    message = "a user with this username already exists"


class UserNotFound(AuthError):
    """No user has that username."""

    code: StatusName = "NOT_FOUND"
    reason = "USER_NOT_FOUND"
    message = "no such user"


class DatabaseUnavailable(AuthError):
    """PostgreSQL cannot be reached or did not answer in time."""

    code: StatusName = "UNAVAILABLE"
    reason = "DATABASE_UNAVAILABLE"
    message = "the database is unavailable; retry later"


class ServiceCredentialsRequired(AuthError):
    """A guarded call (Validate or admin, per AUTH_CALLER_AUTH) came without a known
    service token or client certificate."""

    code: StatusName = "UNAUTHENTICATED"
    reason = "SERVICE_CREDENTIALS_REQUIRED"
    message = "this call needs a known service token or client certificate"


class ServiceNotPermitted(AuthError):
    """The calling service is known but not allowed this group of calls."""

    code: StatusName = "PERMISSION_DENIED"
    reason = "SERVICE_NOT_PERMITTED"
    message = "the calling service may not make this call"


class SessionNotFound(AuthError):
    """No session has that id (admin API)."""

    code: StatusName = "NOT_FOUND"
    reason = "SESSION_NOT_FOUND"
    message = "no such session"


class TooManyCalls(AuthError):
    """The process already has `AUTH_MAX_CONCURRENT_RPCS` unary calls in progress."""

    code: StatusName = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_CALLS"
    message = "the server has too many calls in progress; retry later"


class ShuttingDown(AuthError):
    """The process is stopping (SIGTERM): calls that come after its drain are refused at
    once, before gRPC's own stop, which would end calls it holds unread with CANCELLED
    (a code no client retries; grpc/grpc#41785)."""

    code: StatusName = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"
    message = "the server is shutting down; retry (another replica)"


class TooManyStreams(AuthError):
    """The process already holds `AUTH_MAX_STREAMS` open streams."""

    code: StatusName = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_STREAMS"
    message = "the server has too many open streams; retry later"


class TooManyStreamsFromPeer(AuthError):
    """The caller's address already holds `AUTH_MAX_STREAMS_PER_PEER` open streams."""

    code: StatusName = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_STREAMS_FROM_PEER"
    message = "this address has too many open streams; close one first"


class WatcherTooSlow(AuthError):
    """A WatchRevocations stream had more than `AUTH_WATCH_QUEUE_BYTES` of updates waiting
    (its client does not read them): it is cut off rather than buffered without bound; the
    client reconnects with its sequence."""

    code: StatusName = "RESOURCE_EXHAUSTED"
    reason = "WATCHER_TOO_SLOW"
    message = "the revocation watcher fell too far behind; reconnect with your sequence"


class RevocationLogRewound(AuthError):
    """The database's revocation log went back (restored from a backup): a watcher's
    position may mean nothing now; it reconnects and gets a snapshot."""

    code: StatusName = "UNAVAILABLE"
    reason = "REVOCATION_LOG_REWOUND"
    message = "the revocation log was restored to an earlier point; reconnect"


class StreamMaxAgeReached(AuthError):
    """A stream was open for `AUTH_STREAM_MAX_AGE`: it ends so its slot comes back; the
    client opens a new one (UNAVAILABLE is the code clients retry)."""

    code: StatusName = "UNAVAILABLE"
    reason = "STREAM_MAX_AGE"
    message = "the stream reached its maximum age; open a new one"
