"""The limits of what a request may carry, and the checks that hold requests to them.

Shared by the gRPC adapters (`service.api`) and the `authsvc` command, so that a user the
CLI creates can log in through the API. A check collects every violation and reports them
at once as INVALID_ARGUMENT with field names (`service.errors.InvalidArgument`). Every
limit here is documented in the proto and docs/api.md ("Limits"), and tested.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

# ValidateRequest's limits are the client package's (which checks them before a call).
from authsvc_client.token_check import (
    MAX_AUDIENCE_BYTES,
    MAX_SCOPE_BYTES,
    MAX_SCOPES,
    MAX_TOKEN_BYTES,
    SCOPE_TOKEN_RE,
)

from service.domain.audiences import audience_problem
from service.domain.usernames import (
    MAX_USERNAME_KEY_BYTES,
    new_username_problem,
    username_key_too_long,
)
from service.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_AUDIENCE_BYTES",
    "MAX_ID_BYTES",
    "MAX_PASSWORD_BYTES",
    "MAX_SCOPES",
    "MAX_SCOPE_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_USERNAME_BYTES",
    "MIN_PASSWORD_LENGTH",
    "RequestCheck",
]

MAX_USERNAME_BYTES = 256
MAX_PASSWORD_BYTES = 1024
MAX_ID_BYTES = 256  # session_id and subject in Revoke
MIN_PASSWORD_LENGTH = 8  # of a new password (a login is checked against the hash alone)


class RequestCheck:
    """Collects violations; `done()` raises them all at once."""

    def __init__(self) -> None:
        self._violations: list[FieldViolation] = []

    def text(self, field: str, value: str, *, limit: int, required: bool = True) -> str:
        if not value:
            if required:
                self._violations.append(FieldViolation(field, "is required"))
            return value
        if len(value) > limit or len(value.encode("utf-8")) > limit:
            self._violations.append(FieldViolation(field, f"is longer than {limit} bytes"))
        elif "\x00" in value:
            # Valid UTF-8, but PostgreSQL text cannot hold it.
            self._violations.append(FieldViolation(field, "must not contain NUL characters"))
        return value

    def username(self, field: str, value: str, *, new: bool = False) -> str:
        """A username to look up (the text rules, and a canonical key no user can have is
        refused: it would not fit the store's index), or with `new` one to create (every
        rule of `new_username_problem`)."""
        before = len(self._violations)
        self.text(field, value, limit=MAX_USERNAME_BYTES)
        if len(self._violations) > before:
            return value
        problem = new_username_problem(value) if new else None
        if problem is None and username_key_too_long(value):
            problem = f"is longer than {MAX_USERNAME_KEY_BYTES} bytes once normalised"
        if problem is not None:
            self._violations.append(FieldViolation(field, problem))
        return value

    def new_password(self, field: str, value: str) -> str:
        """A password to set: the text rules and at least MIN_PASSWORD_LENGTH characters."""
        self.text(field, value, limit=MAX_PASSWORD_BYTES)
        if value and len(value) < MIN_PASSWORD_LENGTH:
            self._violations.append(
                FieldViolation(field, f"must be at least {MIN_PASSWORD_LENGTH} characters")
            )
        return value

    def scopes(self, field: str, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) > MAX_SCOPES:
            self._violations.append(FieldViolation(field, f"has more than {MAX_SCOPES} entries"))
            return ()
        for i, scope in enumerate(values):
            if len(scope) > MAX_SCOPE_BYTES:
                self._violations.append(
                    FieldViolation(f"{field}[{i}]", f"is longer than {MAX_SCOPE_BYTES} bytes")
                )
            elif SCOPE_TOKEN_RE.fullmatch(scope) is None:
                self._violations.append(
                    FieldViolation(
                        f"{field}[{i}]",
                        "must be printable ASCII without spaces, quotes or backslashes",
                    )
                )
        # Order kept, duplicates dropped.
        return tuple(dict.fromkeys(values))

    def audience(self, field: str, value: str) -> str:
        """An audience to grant, if named: the rule the settings hold audiences to
        (`audience_problem`), so that a client naming an impossible one is told why."""
        if value and (problem := audience_problem(value)) is not None:
            self._violations.append(FieldViolation(field, problem))
        return value

    def one_of(self, field: str, value: str, allowed: Collection[str], description: str) -> None:
        """A non-empty `value` must be in `allowed` (unless the field is already reported)."""
        if value and value not in allowed and all(v.field != field for v in self._violations):
            self._violations.append(FieldViolation(field, description))

    def violation(self, violation: FieldViolation) -> None:
        self._violations.append(violation)

    def missing(self, field: str) -> None:
        self._violations.append(FieldViolation(field, "is required"))

    def done(self) -> None:
        if self._violations:
            raise InvalidArgument(self._violations)
