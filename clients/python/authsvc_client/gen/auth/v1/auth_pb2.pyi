import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValidationError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALIDATION_ERROR_UNSPECIFIED: _ClassVar[ValidationError]
    VALIDATION_ERROR_MALFORMED: _ClassVar[ValidationError]
    VALIDATION_ERROR_BAD_SIGNATURE: _ClassVar[ValidationError]
    VALIDATION_ERROR_EXPIRED: _ClassVar[ValidationError]
    VALIDATION_ERROR_NOT_YET_VALID: _ClassVar[ValidationError]
    VALIDATION_ERROR_REVOKED: _ClassVar[ValidationError]
    VALIDATION_ERROR_WRONG_AUDIENCE: _ClassVar[ValidationError]
    VALIDATION_ERROR_INSUFFICIENT_SCOPE: _ClassVar[ValidationError]
    VALIDATION_ERROR_VERIFIER_STALE: _ClassVar[ValidationError]
VALIDATION_ERROR_UNSPECIFIED: ValidationError
VALIDATION_ERROR_MALFORMED: ValidationError
VALIDATION_ERROR_BAD_SIGNATURE: ValidationError
VALIDATION_ERROR_EXPIRED: ValidationError
VALIDATION_ERROR_NOT_YET_VALID: ValidationError
VALIDATION_ERROR_REVOKED: ValidationError
VALIDATION_ERROR_WRONG_AUDIENCE: ValidationError
VALIDATION_ERROR_INSUFFICIENT_SCOPE: ValidationError
VALIDATION_ERROR_VERIFIER_STALE: ValidationError

class IssueRequest(_message.Message):
    __slots__ = ("password", "scopes", "audience")
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    password: PasswordCredentials
    scopes: _containers.RepeatedScalarFieldContainer[str]
    audience: str
    def __init__(self, password: _Optional[_Union[PasswordCredentials, _Mapping]] = ..., scopes: _Optional[_Iterable[str]] = ..., audience: _Optional[str] = ...) -> None: ...

class PasswordCredentials(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class IssueResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenPair
    def __init__(self, tokens: _Optional[_Union[TokenPair, _Mapping]] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("refresh_token",)
    REFRESH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    refresh_token: str
    def __init__(self, refresh_token: _Optional[str] = ...) -> None: ...

class RefreshResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenPair
    def __init__(self, tokens: _Optional[_Union[TokenPair, _Mapping]] = ...) -> None: ...

class TokenPair(_message.Message):
    __slots__ = ("access_token", "refresh_token", "token_type", "access_token_expires_at", "refresh_token_expires_at", "session_id", "scopes")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    refresh_token: str
    token_type: str
    access_token_expires_at: _timestamp_pb2.Timestamp
    refresh_token_expires_at: _timestamp_pb2.Timestamp
    session_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, access_token: _Optional[str] = ..., refresh_token: _Optional[str] = ..., token_type: _Optional[str] = ..., access_token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refresh_token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("access_token", "required_scopes", "audience")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    audience: str
    def __init__(self, access_token: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., audience: _Optional[str] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("valid", "error", "subject", "session_id", "scopes", "expires_at", "token_id")
    VALID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    error: ValidationError
    subject: str
    session_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    token_id: str
    def __init__(self, valid: _Optional[bool] = ..., error: _Optional[_Union[ValidationError, str]] = ..., subject: _Optional[str] = ..., session_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_id: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("refresh_token", "access_token", "session_id", "subject")
    REFRESH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    refresh_token: str
    access_token: str
    session_id: str
    subject: str
    def __init__(self, refresh_token: _Optional[str] = ..., access_token: _Optional[str] = ..., session_id: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_sessions", "revoked_sessions_is_lower_bound")
    REVOKED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SESSIONS_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    revoked_sessions: int
    revoked_sessions_is_lower_bound: bool
    def __init__(self, revoked_sessions: _Optional[int] = ..., revoked_sessions_is_lower_bound: _Optional[bool] = ...) -> None: ...

class GetJwksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJwksResponse(_message.Message):
    __slots__ = ("jwks_json",)
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    def __init__(self, jwks_json: _Optional[str] = ...) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ("after_sequence",)
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    def __init__(self, after_sequence: _Optional[int] = ...) -> None: ...

class RevokedSession(_message.Message):
    __slots__ = ("session_id", "keep_until")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNTIL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep_until: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., keep_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevokedUser(_message.Message):
    __slots__ = ("subject", "generation", "keep_until")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNTIL_FIELD_NUMBER: _ClassVar[int]
    subject: str
    generation: int
    keep_until: _timestamp_pb2.Timestamp
    def __init__(self, subject: _Optional[str] = ..., generation: _Optional[int] = ..., keep_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevocationUpdate(_message.Message):
    __slots__ = ("sequence", "snapshot", "revoked", "jwks_json", "sent_at", "revoked_users")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_USERS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    snapshot: bool
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedSession]
    jwks_json: str
    sent_at: _timestamp_pb2.Timestamp
    revoked_users: _containers.RepeatedCompositeFieldContainer[RevokedUser]
    def __init__(self, sequence: _Optional[int] = ..., snapshot: _Optional[bool] = ..., revoked: _Optional[_Iterable[_Union[RevokedSession, _Mapping]]] = ..., jwks_json: _Optional[str] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_users: _Optional[_Iterable[_Union[RevokedUser, _Mapping]]] = ...) -> None: ...
