"""auth.v1.AdminService: a thin adapter over the user directory and the signing keys.

Who may call it is decided before a method runs (`service.api.callers`); the calling
service's name arrives here as the actor recorded with every security event.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from authsvc_client.gen.auth.v1 import admin_pb2

from service.api.admin_refusals import AdminRefusals
from service.api.callers import calling_service
from service.api.status import Handler, Req, Resp, maps_errors
from service.api.wire import Context, add_servicer, caller_info, timestamp
from service.api.wrapped_handlers import HandlerRegistry
from service.domain.records import CallerInfo, SessionRecord, UserRecord
from service.domain.revocation import revoked_count_is_lower_bound
from service.domain.signing_keys import SigningKeyInfo, SigningKeys
from service.domain.users import UserDirectory, UserRef
from service.errors import AuthError, FieldViolation
from service.request_limits import MAX_ID_BYTES, RequestCheck

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_TOKEN_BYTES = 256

_KEY_STATES = {
    "pending": admin_pb2.SIGNING_KEY_STATE_PENDING,
    "active": admin_pb2.SIGNING_KEY_STATE_ACTIVE,
    "superseded": admin_pb2.SIGNING_KEY_STATE_SUPERSEDED,
    "retired": admin_pb2.SIGNING_KEY_STATE_RETIRED,
}


def _operator(context: Context) -> CallerInfo:
    return replace(caller_info(context), actor=f"admin:{calling_service(context) or 'anonymous'}")


def _user_ref(check: RequestCheck, selector: admin_pb2.UserSelector, present: bool) -> UserRef:
    kind = selector.WhichOneof("selector") if present else None
    if kind == "user_id":
        raw = check.text("user.user_id", selector.user_id, limit=MAX_ID_BYTES)
        if not raw or len(raw) > MAX_ID_BYTES:
            return ""  # already reported
        try:
            return uuid.UUID(raw)
        except ValueError:
            check.violation(FieldViolation("user.user_id", "must be a UUID"))
            return ""
    if kind == "username":
        return check.username("user.username", selector.username)
    check.missing("user")
    return ""


def _user(record: UserRecord) -> admin_pb2.User:
    return admin_pb2.User(
        user_id=str(record.id),
        username=record.username,
        scopes=list(record.scopes),
        disabled=record.disabled,
        created_at=timestamp(record.created_at.timestamp()),
    )


def _session(record: SessionRecord) -> admin_pb2.Session:
    session = admin_pb2.Session(
        session_id=str(record.id),
        user_id=str(record.user_id),
        created_at=timestamp(record.created_at.timestamp()),
        expires_at=timestamp(record.expires_at.timestamp()),
        scopes=list(record.scopes),
        audience=record.audience,
        peer=record.peer or "",
        user_agent=record.user_agent or "",
    )
    if record.last_refreshed_at is not None:
        session.last_refreshed_at.CopyFrom(timestamp(record.last_refreshed_at.timestamp()))
    return session


def _signing_key(info: SigningKeyInfo) -> admin_pb2.SigningKey:
    key = admin_pb2.SigningKey(
        kid=info.kid,
        alg=info.alg,
        state=_KEY_STATES[info.state],
        created_at=timestamp(info.created_at.timestamp()),
        activates_at=timestamp(info.activates_at.timestamp()),
    )
    if info.retires_at is not None:
        key.retires_at.CopyFrom(timestamp(info.retires_at.timestamp()))
    if info.retired_at is not None:
        key.retired_at.CopyFrom(timestamp(info.retired_at.timestamp()))
    return key


def _admin_method(
    handler: Handler[AdminServicer, Req, Resp],
) -> Handler[AdminServicer, Req, Resp]:
    """`maps_errors`, with every refusal (unknown user, bad argument, ...) recorded as a
    security event (`service.api.admin_refusals`)."""

    async def record(
        servicer: AdminServicer, method: str, error: AuthError, context: Context
    ) -> None:
        await servicer.refusals.record(
            method=method, reason=error.reason, caller=_operator(context)
        )

    return maps_errors(handler, on_refused=record)


class AdminServicer:
    """Implements auth.v1.AdminService."""

    def __init__(self, *, users: UserDirectory, keys: SigningKeys, refusals: AdminRefusals) -> None:
        self._users = users
        self._keys = keys
        self.refusals = refusals

    @_admin_method
    async def CreateUser(
        self, request: admin_pb2.CreateUserRequest, context: Context
    ) -> admin_pb2.CreateUserResponse:
        check = RequestCheck()
        username = check.username("username", request.username, new=True)
        password = check.new_password("password", request.password)
        scopes = check.scopes("scopes", request.scopes)
        check.done()
        user = await self._users.create(username, password, scopes, caller=_operator(context))
        return admin_pb2.CreateUserResponse(user=_user(user))

    @_admin_method
    async def SetPassword(
        self, request: admin_pb2.SetPasswordRequest, context: Context
    ) -> admin_pb2.SetPasswordResponse:
        check = RequestCheck()
        user = _user_ref(check, request.user, request.HasField("user"))
        password = check.new_password("password", request.password)
        check.done()
        revoked = await self._users.set_password(
            user, password, revoke_sessions=not request.keep_sessions, caller=_operator(context)
        )
        return admin_pb2.SetPasswordResponse(
            revoked_sessions=revoked,
            revoked_sessions_is_lower_bound=revoked_count_is_lower_bound(revoked),
        )

    @_admin_method
    async def DisableUser(
        self, request: admin_pb2.DisableUserRequest, context: Context
    ) -> admin_pb2.DisableUserResponse:
        check = RequestCheck()
        user = _user_ref(check, request.user, request.HasField("user"))
        check.done()
        revoked = await self._users.set_disabled(user, True, caller=_operator(context))
        return admin_pb2.DisableUserResponse(
            revoked_sessions=revoked,
            revoked_sessions_is_lower_bound=revoked_count_is_lower_bound(revoked),
        )

    @_admin_method
    async def EnableUser(
        self, request: admin_pb2.EnableUserRequest, context: Context
    ) -> admin_pb2.EnableUserResponse:
        check = RequestCheck()
        user = _user_ref(check, request.user, request.HasField("user"))
        check.done()
        await self._users.set_disabled(user, False, caller=_operator(context))
        return admin_pb2.EnableUserResponse()

    @_admin_method
    async def DeleteUser(
        self, request: admin_pb2.DeleteUserRequest, context: Context
    ) -> admin_pb2.DeleteUserResponse:
        check = RequestCheck()
        user = _user_ref(check, request.user, request.HasField("user"))
        check.done()
        revoked = await self._users.delete(user, caller=_operator(context))
        return admin_pb2.DeleteUserResponse(
            revoked_sessions=revoked,
            revoked_sessions_is_lower_bound=revoked_count_is_lower_bound(revoked),
        )

    @_admin_method
    async def ListSessions(
        self, request: admin_pb2.ListSessionsRequest, context: Context
    ) -> admin_pb2.ListSessionsResponse:
        check = RequestCheck()
        user = _user_ref(check, request.user, request.HasField("user"))
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            check.violation(FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}"))
        page_token = check.text(
            "page_token", request.page_token, limit=MAX_PAGE_TOKEN_BYTES, required=False
        )
        check.done()
        page = await self._users.sessions(
            user,
            page_size=request.page_size or DEFAULT_PAGE_SIZE,
            page_token=page_token,
            caller=_operator(context),
        )
        return admin_pb2.ListSessionsResponse(
            sessions=[_session(s) for s in page.sessions], next_page_token=page.next_page_token
        )

    @_admin_method
    async def RevokeSession(
        self, request: admin_pb2.RevokeSessionRequest, context: Context
    ) -> admin_pb2.RevokeSessionResponse:
        check = RequestCheck()
        session_id = check.text("session_id", request.session_id, limit=MAX_ID_BYTES)
        check.done()
        revoked = await self._users.revoke_session(session_id, caller=_operator(context))
        return admin_pb2.RevokeSessionResponse(revoked_sessions=revoked)

    @_admin_method
    async def RotateSigningKey(
        self, request: admin_pb2.RotateSigningKeyRequest, context: Context
    ) -> admin_pb2.RotateSigningKeyResponse:
        operator = _operator(context)
        info = await self._keys.rotate(reason="admin", actor=operator.actor, peer=operator.peer)
        return admin_pb2.RotateSigningKeyResponse(key=_signing_key(info))

    @_admin_method
    async def ListSigningKeys(
        self, request: admin_pb2.ListSigningKeysRequest, context: Context
    ) -> admin_pb2.ListSigningKeysResponse:
        await self._users.audit("signing_keys_listed", caller=_operator(context))
        return admin_pb2.ListSigningKeysResponse(
            keys=[_signing_key(k) for k in await self._keys.describe()]
        )


def add_admin_servicer(servicer: AdminServicer, server: HandlerRegistry) -> None:
    add_servicer(servicer, admin_pb2.DESCRIPTOR.services_by_name["AdminService"], server)
