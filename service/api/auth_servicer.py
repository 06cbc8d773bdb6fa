"""auth.v1.AuthService: a thin adapter between gRPC messages and the domain."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2

from service.api.revocation_watch import RevocationWatchHub
from service.api.status import maps_errors
from service.api.wire import (
    add_servicer,
    bearer_credential,
    caller_info,
    caller_peer,
    set_timestamp,
    timestamp_fields,
)
from service.api.wrapped_handlers import HandlerRegistry
from service.domain.access_tokens import TokenProblem
from service.domain.revocation import revoked_count_is_lower_bound
from service.domain.sessions import RevokeService
from service.domain.signing_keys import SigningKeys
from service.domain.tokens import UNKNOWN_AUDIENCE, TokenPair, TokenService
from service.domain.validation import AccessTokenValidator
from service.errors import RevocationLogRewound, ShuttingDown, WatcherTooSlow
from service.request_limits import (
    MAX_AUDIENCE_BYTES,
    MAX_ID_BYTES,
    MAX_PASSWORD_BYTES,
    MAX_TOKEN_BYTES,
    RequestCheck,
)

Context = grpc.aio.ServicerContext[Any, Any]

# How long a watcher resuming from a position ahead of this process waits for it.
_REACH_SECONDS = 2.0

_PROBLEMS = {
    TokenProblem.MALFORMED: auth_pb2.VALIDATION_ERROR_MALFORMED,
    TokenProblem.BAD_SIGNATURE: auth_pb2.VALIDATION_ERROR_BAD_SIGNATURE,
    TokenProblem.EXPIRED: auth_pb2.VALIDATION_ERROR_EXPIRED,
    TokenProblem.NOT_YET_VALID: auth_pb2.VALIDATION_ERROR_NOT_YET_VALID,
    TokenProblem.REVOKED: auth_pb2.VALIDATION_ERROR_REVOKED,
    TokenProblem.WRONG_AUDIENCE: auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE,
    TokenProblem.INSUFFICIENT_SCOPE: auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE,
}


def _set_token_pair(message: auth_pb2.TokenPair, pair: TokenPair) -> None:
    """Write `pair` into a response's `tokens`, field by field, in place: about half the
    work of building a TokenPair message (and its Timestamps) to be copied in."""
    message.access_token = pair.access_token
    message.refresh_token = pair.refresh_token
    message.token_type = "Bearer"
    set_timestamp(message.access_token_expires_at, pair.access_token_expires_at)
    set_timestamp(message.refresh_token_expires_at, pair.refresh_token_expires_at)
    message.session_id = pair.session_id
    message.scopes.extend(pair.scopes)


class AuthServicer:
    """Implements auth.v1.AuthService over the domain's services."""

    def __init__(
        self,
        *,
        tokens: TokenService,
        validator: AccessTokenValidator,
        revoke: RevokeService,
        keys: SigningKeys,
        watch: RevocationWatchHub,
    ) -> None:
        self._tokens = tokens
        self._validator = validator
        self._revoke = revoke
        self._keys = keys
        self._watch = watch

    @maps_errors
    async def Issue(
        self, request: auth_pb2.IssueRequest, context: Context
    ) -> auth_pb2.IssueResponse:
        check = RequestCheck()
        if request.WhichOneof("credentials") != "password":
            check.missing("password")
        username = check.username("password.username", request.password.username)
        password = check.text(
            "password.password", request.password.password, limit=MAX_PASSWORD_BYTES
        )
        scopes = check.scopes("scopes", request.scopes)
        audience = check.audience("audience", request.audience)
        check.one_of("audience", audience, self._tokens.issuable_audiences, UNKNOWN_AUDIENCE)
        check.done()
        pair = await self._tokens.issue(
            username=username,
            password=password,
            scopes=scopes,
            audience=audience or None,
            caller=caller_info(context),
        )
        response = auth_pb2.IssueResponse()
        _set_token_pair(response.tokens, pair)
        return response

    @maps_errors
    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: Context
    ) -> auth_pb2.RefreshResponse:
        check = RequestCheck()
        token = check.text("refresh_token", request.refresh_token, limit=MAX_TOKEN_BYTES)
        check.done()
        pair = await self._tokens.refresh(token, caller=caller_peer(context))
        response = auth_pb2.RefreshResponse()
        _set_token_pair(response.tokens, pair)
        return response

    @maps_errors
    async def Validate(
        self, request: auth_pb2.ValidateRequest, context: Context
    ) -> auth_pb2.ValidateResponse:
        check = RequestCheck()
        token = check.text("access_token", request.access_token, limit=MAX_TOKEN_BYTES)
        required = check.scopes("required_scopes", request.required_scopes)
        audience = check.text(
            "audience", request.audience, limit=MAX_AUDIENCE_BYTES, required=False
        )
        check.done()
        result = await self._validator.validate_with_new_keys(
            token, required_scopes=required, audience=audience or None
        )
        if result.claims is None:
            assert result.problem is not None
            return auth_pb2.ValidateResponse(valid=False, error=_PROBLEMS[result.problem])
        claims = result.claims
        return auth_pb2.ValidateResponse(
            valid=True,
            subject=claims.subject,
            session_id=claims.session_id,
            scopes=claims.scopes,
            expires_at=timestamp_fields(claims.expires_at),
            token_id=claims.token_id,
        )

    @maps_errors
    async def Revoke(
        self, request: auth_pb2.RevokeRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        check = RequestCheck()
        target = request.WhichOneof("target")
        caller = caller_info(context)
        if target is None:
            check.missing("target")
            check.done()
        value = check.text(
            str(target),
            getattr(request, str(target)),
            limit=MAX_TOKEN_BYTES if target in ("refresh_token", "access_token") else MAX_ID_BYTES,
        )
        check.done()
        if target == "refresh_token":
            count = await self._revoke.revoke_refresh_token(value, caller=caller)
        elif target == "access_token":
            count = await self._revoke.revoke_access_token(value, caller=caller)
        elif target == "session_id":
            count = await self._revoke.revoke_session(
                value,
                caller_token=bearer_credential(context, max_length=MAX_TOKEN_BYTES),
                caller=caller,
            )
        else:
            count = await self._revoke.revoke_subject(
                value,
                caller_token=bearer_credential(context, max_length=MAX_TOKEN_BYTES),
                caller=caller,
            )
        return auth_pb2.RevokeResponse(
            revoked_sessions=count,
            revoked_sessions_is_lower_bound=target == "subject"
            and revoked_count_is_lower_bound(count),
        )

    @maps_errors
    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Context
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(jwks_json=self._keys.ring.jwks_json)

    @maps_errors
    async def WatchRevocations(
        self, request: auth_pb2.WatchRevocationsRequest, context: Context
    ) -> None:
        """The first updates, then a writer task feeding the stream from the watcher's
        queue, until the client goes, the stream's age runs out, or the queue overflows
        (WatcherTooSlow). Any after_sequence is acceptable: one this process cannot resume
        from gets a snapshot."""
        hub = self._watch
        after = request.after_sequence
        if after:
            # A position from another replica, a little ahead of us: wait (briefly) for
            # our feed to get there rather than send a snapshot older than what the client
            # holds.
            await hub.reach(after, _REACH_SECONDS)
        # Headers in a batch of their own: the status of a cut-off must not be sent with
        # them again while a write they went with is stuck on flow control.
        await context.send_initial_metadata(())
        watcher, first = hub.open(after)
        writer = asyncio.create_task(hub.write_updates(watcher, first, context.write))
        cut_off = asyncio.create_task(watcher.cut_off.wait())
        try:
            await asyncio.wait((writer, cut_off), return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                if isinstance(writer.exception(), grpc.aio.InternalError):
                    # gRPC could not send (ExecuteBatchError): the client's connection is
                    # gone, cut while a write waited on flow control. The stream is over;
                    # nobody is there for a status, and it is no error of ours.
                    return
                writer.result()  # any other failure is unexpected
            if watcher.stopping:
                raise ShuttingDown()
            if watcher.rewound:
                raise RevocationLogRewound()
            raise WatcherTooSlow()
        finally:
            hub.close(watcher)
            for task in (writer, cut_off):
                task.cancel()
            await asyncio.gather(writer, cut_off, return_exceptions=True)


def add_auth_servicer(servicer: AuthServicer, server: HandlerRegistry) -> None:
    add_servicer(servicer, auth_pb2.DESCRIPTOR.services_by_name["AuthService"], server)
