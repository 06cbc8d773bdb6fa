"""authsvc_client.client.AuthClient: typed results and errors against the real server; retries,
deadlines and metadata against a small fake authsvc that fails on command."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from authsvc_client.client import AuthClient, AuthServiceError, RetryPolicy
from authsvc_client.gen.auth.v1 import auth_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.live_server import PASSWORD, LiveServer, ServerFactory

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)
SERVICE_TOKEN = "svc-secret-token"
LONG_SERVICE_TOKEN = "orders-service-token-0123456789abcdef"


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[AuthClient]:
    async with AuthClient(target=server.address) as auth:
        yield auth


async def test_issue_validate_refresh_jwks_revoke_typed_results(
    server: LiveServer, client: AuthClient
) -> None:
    user = await server.create_user("alice", scopes=("read", "write"))
    pair = await client.issue("alice", PASSWORD, scopes=("read",))
    assert pair.token_type == "Bearer"
    assert pair.scopes == ("read",)
    issued_at = datetime.fromtimestamp(server.clock.now(), tz=UTC)
    assert pair.access_token_expires_at == issued_at + timedelta(seconds=900)
    assert pair.refresh_token_expires_at > pair.access_token_expires_at

    check = await client.validate(pair.access_token, required_scopes=("read",))
    assert check.valid
    assert check.error is None
    assert check.subject == str(user.id)
    assert check.session_id == pair.session_id
    assert check.scopes == ("read",)
    assert check.expires_at == pair.access_token_expires_at
    assert check.token_id

    denied = await client.validate(pair.access_token, required_scopes=("write",))
    assert (denied.valid, denied.error, denied.subject) == (False, "INSUFFICIENT_SCOPE", "")
    assert denied.expires_at is None

    new = await client.refresh(pair.refresh_token)
    assert new.session_id == pair.session_id
    assert new.refresh_token != pair.refresh_token

    jwks = await client.get_jwks()
    kid = jwt.get_unverified_header(new.access_token)["kid"]
    key = jwks.key(kid)
    assert key is not None
    assert key["use"] == "sig"
    assert json.loads(jwks.json)["keys"] == list(jwks.keys)

    assert await client.revoke(refresh_token=new.refresh_token) == 1
    assert await client.revoke(refresh_token=new.refresh_token) == 0
    assert (await client.validate(new.access_token)).error == "REVOKED"
    with pytest.raises(AuthServiceError) as caught:
        await client.refresh(new.refresh_token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "SESSION_REVOKED"


async def test_wrong_password_is_a_typed_error_without_the_password(
    server: LiveServer, client: AuthClient
) -> None:
    await server.create_user("bob")
    with pytest.raises(AuthServiceError) as caught:
        await client.issue("bob", "wrong-password-xyz")
    error = caught.value
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "INVALID_CREDENTIALS"
    assert error.message
    assert "wrong-password-xyz" not in f"{error} {error!r} {error.args}"


async def test_invalid_argument_names_the_fields(client: AuthClient) -> None:
    with pytest.raises(AuthServiceError) as caught:
        await client.validate("")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert caught.value.fields == ("access_token",)


async def test_revoke_by_session_sends_the_callers_token(
    server: LiveServer, client: AuthClient
) -> None:
    await server.create_user("carol")
    pair = await client.issue("carol", PASSWORD)
    with pytest.raises(AuthServiceError) as caught:
        await client.revoke(session_id=pair.session_id)
    assert caught.value.reason == "CALLER_UNAUTHENTICATED"
    assert pair.access_token not in str(caught.value)
    revoked = await client.revoke(session_id=pair.session_id, caller_token=pair.access_token)
    assert revoked == 1
    with pytest.raises(ValueError, match="exactly one"):
        await client.revoke()
    with pytest.raises(ValueError, match="exactly one"):
        await client.revoke(session_id="s", subject="u")


async def test_reprs_hide_tokens(server: LiveServer) -> None:
    await server.create_user("dave")
    async with AuthClient(target=server.address, service_token=SERVICE_TOKEN) as auth:
        pair = await auth.issue("dave", PASSWORD)
        assert SERVICE_TOKEN not in repr(auth)
    text = repr(pair)
    assert pair.session_id in text
    assert pair.access_token not in text
    assert pair.refresh_token not in text


async def test_close_then_reuse_reopens_the_channel(server: LiveServer) -> None:
    auth = AuthClient(target=server.address)
    assert (await auth.get_jwks()).keys
    await auth.close()
    await auth.close()  # twice is harmless
    assert (await auth.get_jwks()).keys
    await auth.close()


# --- a fake authsvc that fails on command -------------------------------------------------


class FakeAuthsvc:
    """auth.v1.AuthService whose first `failures` calls of every method fail with `code`
    (carrying an ErrorInfo with reason FAKE), then succeed with canned answers. Records each
    call's method and authorization header."""

    def __init__(self, *, code: grpc.StatusCode, failures: float) -> None:
        self.code = code
        self.failures = failures
        self.calls: list[tuple[str, str | None]] = []
        self.server = grpc.aio.server()
        handlers = {
            "Issue": self._handler(
                "Issue", auth_pb2.IssueRequest, self._pair(auth_pb2.IssueResponse)
            ),
            "Refresh": self._handler(
                "Refresh", auth_pb2.RefreshRequest, self._pair(auth_pb2.RefreshResponse)
            ),
            "Validate": self._handler(
                "Validate",
                auth_pb2.ValidateRequest,
                lambda: auth_pb2.ValidateResponse(valid=True, subject="fake-subject"),
            ),
            "Revoke": self._handler(
                "Revoke",
                auth_pb2.RevokeRequest,
                lambda: auth_pb2.RevokeResponse(revoked_sessions=1),
            ),
            "GetJwks": self._handler(
                "GetJwks", auth_pb2.GetJwksRequest, lambda: auth_pb2.GetJwksResponse(jwks_json="{}")
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("auth.v1.AuthService", handlers),)
        )

    @staticmethod
    def _pair(kind: Callable[..., Message]) -> Callable[[], Message]:
        return lambda: kind(tokens=auth_pb2.TokenPair(session_id="fake-session"))

    def _handler(
        self, method: str, request_type: type[Message], answer: Callable[[], Message]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            authorization = dict(context.invocation_metadata() or ()).get("authorization")
            self.calls.append((method, str(authorization) if authorization else None))
            if sum(1 for m, _ in self.calls if m == method) <= self.failures:
                info = error_details_pb2.ErrorInfo(reason="FAKE", domain="authsvc")
                detail = status_pb2.Status(code=self.code.value[0], message="fake failure")
                detail.details.add().Pack(info)
                await context.abort_with_status(rpc_status.to_status(detail))
            return answer()

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    def attempts(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def fake_factory() -> AsyncIterator[Callable[..., Awaitable[tuple[FakeAuthsvc, str]]]]:
    started: list[FakeAuthsvc] = []

    async def start(
        *, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, failures: float = 0, port: int = 0
    ) -> tuple[FakeAuthsvc, str]:
        fake = FakeAuthsvc(code=code, failures=failures)
        bound = fake.server.add_insecure_port(f"127.0.0.1:{port}")
        await fake.server.start()
        started.append(fake)
        return fake, f"127.0.0.1:{bound}"

    yield start
    for fake in started:
        await fake.server.stop(None)


FakeFactory = Callable[..., Awaitable[tuple[FakeAuthsvc, str]]]


async def test_unavailable_is_retried_until_it_succeeds(fake_factory: FakeFactory) -> None:
    fake, target = await fake_factory(failures=2)
    async with AuthClient(target=target, retry=FAST_RETRY) as auth:
        check = await auth.validate("token")
        jwks = await auth.get_jwks()
        revoked = await auth.revoke(access_token="token")
        pair = await auth.refresh("refresh")
    assert (check.valid, check.subject) == (True, "fake-subject")
    assert jwks.keys == ()
    assert revoked == 1
    assert pair.session_id == "fake-session"
    for method in ("Validate", "GetJwks", "Revoke", "Refresh"):
        assert fake.attempts(method) == 3, method


async def test_retries_stop_after_max_attempts(fake_factory: FakeFactory) -> None:
    fake, target = await fake_factory(failures=math.inf)
    async with AuthClient(target=target, retry=FAST_RETRY) as auth:
        with pytest.raises(AuthServiceError) as caught:
            await auth.validate("token")
    assert fake.attempts("Validate") == FAST_RETRY.max_attempts
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "FAKE"


async def test_retries_stop_at_the_deadline(fake_factory: FakeFactory) -> None:
    fake, target = await fake_factory(failures=math.inf)
    slow = RetryPolicy(max_attempts=100, initial_backoff=0.2, max_backoff=0.2, multiplier=1)
    async with AuthClient(target=target, retry=slow, rng=random.Random(7)) as auth:
        started = time.monotonic()
        with pytest.raises(AuthServiceError) as caught:
            await auth.validate("token", timeout=0.6)
        elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 0.9
    assert 2 <= fake.attempts("Validate") < 100


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
async def test_other_codes_are_not_retried(
    fake_factory: FakeFactory, code: grpc.StatusCode
) -> None:
    fake, target = await fake_factory(code=code, failures=1)
    async with AuthClient(target=target, retry=FAST_RETRY) as auth:
        with pytest.raises(AuthServiceError) as caught:
            await auth.validate("token")
    assert caught.value.code == code
    assert caught.value.reason == "FAKE"
    assert fake.attempts("Validate") == 1


async def test_issue_is_never_retried_and_refresh_retry_can_be_off(
    fake_factory: FakeFactory,
) -> None:
    fake, target = await fake_factory(failures=1)
    async with AuthClient(target=target, retry=FAST_RETRY, retry_refresh=False) as auth:
        calls: tuple[Callable[[], Awaitable[object]], ...] = (
            lambda: auth.issue("u", "p"),
            lambda: auth.refresh("r"),
        )
        for call in calls:
            with pytest.raises(AuthServiceError) as caught:
                await call()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake.attempts("Issue") == 1
    assert fake.attempts("Refresh") == 1


async def test_service_token_goes_to_validate_and_jwks_only(fake_factory: FakeFactory) -> None:
    fake, target = await fake_factory()
    async with AuthClient(target=target, service_token=SERVICE_TOKEN) as auth:
        await auth.validate("token")
        await auth.get_jwks()
        await auth.issue("u", "p")
        await auth.refresh("r")
        await auth.revoke(refresh_token="r")
        await auth.revoke(session_id="s", caller_token="user-access-token")
    assert fake.calls == [
        ("Validate", f"Bearer {SERVICE_TOKEN}"),
        ("GetJwks", f"Bearer {SERVICE_TOKEN}"),
        ("Issue", None),
        ("Refresh", None),
        ("Revoke", None),
        ("Revoke", "Bearer user-access-token"),
    ]


async def test_a_server_that_starts_late_is_reached_by_retries(
    fake_factory: FakeFactory,
) -> None:
    port = free_port()
    patient = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.2)
    # Short reconnect backoff so the channel notices the new server within the test.
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
    async with AuthClient(
        target=f"127.0.0.1:{port}", retry=patient, options=options, timeout=5.0
    ) as auth:
        call = asyncio.create_task(auth.validate("token"))
        await asyncio.sleep(0.4)
        assert not call.done()  # still retrying: nothing listens yet
        fake, _ = await fake_factory(port=port)
        check = await asyncio.wait_for(call, timeout=5)
    assert check.valid
    assert fake.attempts("Validate") == 1


async def test_connection_refused_without_retries_is_unavailable_without_reason() -> None:
    async with AuthClient(
        target=f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=1)
    ) as auth:
        with pytest.raises(AuthServiceError) as caught:
            await auth.get_jwks(timeout=2)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason is None


async def test_service_token_is_accepted_where_authsvc_requires_one(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    tokens_file = tmp_path / "service-tokens"
    tokens_file.write_text(f"orders validate token:{LONG_SERVICE_TOKEN}\n")
    guarded = await server_factory(
        caller_auth=frozenset({"validate"}), service_tokens_file=tokens_file
    )
    await guarded.create_user("erin")
    async with AuthClient(target=guarded.address, service_token=LONG_SERVICE_TOKEN) as auth:
        pair = await auth.issue("erin", PASSWORD)
        assert (await auth.validate(pair.access_token)).valid
        assert await auth.revoke(session_id=pair.session_id, caller_token=pair.access_token) == 1
    async with AuthClient(target=guarded.address) as anonymous:
        with pytest.raises(AuthServiceError) as caught:
            await anonymous.validate(pair.access_token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "SERVICE_CREDENTIALS_REQUIRED"


def test_a_validation_error_this_client_does_not_know_is_still_not_valid() -> None:
    """A newer server may add reasons: the answer stays valid=False, with a readable name."""
    from authsvc_client.client import _validation

    response = auth_pb2.ValidateResponse(valid=False)
    response.error = 99  # type: ignore[assignment]
    verdict = _validation(response)
    assert not verdict.valid
    assert verdict.error == "UNKNOWN_99"
