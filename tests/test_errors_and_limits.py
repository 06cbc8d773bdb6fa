"""Every row of the error table, every request limit, undecodable requests, and no
password or token in any error, all against the live server over gRPC.

Each failing call goes through `expect_error`, which also checks that no password
or token of the call appears in the status message, the google.rpc.Status
details or the trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from grpc_status import rpc_status

from service.clock import ManualClock
from service.domain.passwords import PasswordHasher
from service.settings import Settings
from tests.helpers import assert_error, bad_request_fields, error_info
from tests.live_server import (
    PASSWORD,
    TEST_KEK,
    LiveServer,
    ServerFactory,
    start_live_server,
    stop_live_server,
)
from tests.throwaway_pg import start_migrated, stop_embedded_postgres

Code = grpc.StatusCode
WRONG_PASSWORD = "wrong-password-Zq9xK"
MAX_TOKEN = 8 * 1024
MAX_USERNAME = 256
MAX_PASSWORD = 1024
MAX_SCOPES = 32
MAX_SCOPE = 128
MAX_AUDIENCE = 256
MAX_ID = 256


# Helpers


def _error_texts(error: grpc.aio.AioRpcError) -> list[bytes]:
    """Everything a client can read off a failed call, as bytes."""
    texts = [(error.details() or "").encode()]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        texts.append(status.message.encode())
        texts.extend(detail.value for detail in status.details)
    for _key, value in error.trailing_metadata() or ():
        texts.append(value if isinstance(value, bytes) else str(value).encode())
    return texts


def assert_no_secrets(error: grpc.aio.AioRpcError, secret_values: Iterable[str]) -> None:
    texts = _error_texts(error)
    for secret in (PASSWORD, *secret_values):
        if not secret:
            continue
        needle = secret.encode()
        for text in texts:
            assert needle not in text, f"a secret ({secret[:12]}...) leaked into the error"


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str,
    *,
    secret_values: Iterable[str] = (),
) -> grpc.aio.AioRpcError:
    """Await `call`, which must fail with `code` and ErrorInfo `reason`, leaking nothing."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert_error(error, code, reason)
    assert_no_secrets(error, secret_values)
    return error


async def expect_invalid(
    call: Awaitable[Any],
    field: str,
    *,
    secret_values: Iterable[str] = (),
    only: bool = True,
) -> list[str]:
    """INVALID_ARGUMENT with a BadRequest naming `field` (and, if `only`, nothing else)."""
    error = await expect_error(
        call, Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", secret_values=secret_values
    )
    fields = bad_request_fields(error)
    if only:
        assert fields == [field]
    else:
        assert field in fields, fields
    return fields


async def not_invalid(call: Awaitable[Any], *, secret_values: Iterable[str] = ()) -> Any:
    """At a limit: the call may succeed or fail for another reason, never INVALID_ARGUMENT."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        failure = error
    assert failure.code() != Code.INVALID_ARGUMENT, (failure.details(), failure.code())
    assert_no_secrets(failure, secret_values)
    return failure


def issue(
    server: LiveServer,
    username: str,
    password: str = PASSWORD,
    *,
    scopes: Iterable[str] = (),
    audience: str = "",
) -> Awaitable[auth_pb2.IssueResponse]:
    return server.stub.Issue(
        auth_pb2.IssueRequest(
            password=auth_pb2.PasswordCredentials(username=username, password=password),
            scopes=list(scopes),
            audience=audience,
        )
    )


def refresh(server: LiveServer, token: str) -> Awaitable[auth_pb2.RefreshResponse]:
    return server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=token))


def validate(
    server: LiveServer,
    token: str,
    *,
    required_scopes: Iterable[str] = (),
    audience: str = "",
) -> Awaitable[auth_pb2.ValidateResponse]:
    return server.stub.Validate(
        auth_pb2.ValidateRequest(
            access_token=token, required_scopes=list(required_scopes), audience=audience
        )
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# Issue: INVALID_CREDENTIALS and SCOPE_NOT_ALLOWED


async def test_unknown_user_wrong_password_and_disabled_user_fail_identically(
    server: LiveServer,
) -> None:
    await server.create_user("alice")
    await server.create_user("bob")
    # Bob can log in before he is disabled, so the failure below is the flag's doing.
    await server.login("bob")
    await server.running.components.users.set_disabled("bob", True)

    errors = [
        await expect_error(
            issue(server, "nobody-at-all"), Code.UNAUTHENTICATED, "INVALID_CREDENTIALS"
        ),
        await expect_error(
            issue(server, "alice", WRONG_PASSWORD),
            Code.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
            secret_values=[WRONG_PASSWORD],
        ),
        await expect_error(issue(server, "bob"), Code.UNAUTHENTICATED, "INVALID_CREDENTIALS"),
        await expect_error(
            issue(server, "bob", WRONG_PASSWORD),
            Code.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
            secret_values=[WRONG_PASSWORD],
        ),
    ]
    first = errors[0]
    for other in errors[1:]:
        assert other.code() == first.code()
        assert other.details() == first.details()
        assert error_info(other) == error_info(first)
        status, first_status = rpc_status.from_call(other), rpc_status.from_call(first)  # type: ignore[arg-type]
        assert status is not None
        assert first_status is not None
        assert status.SerializeToString(deterministic=True) == first_status.SerializeToString(
            deterministic=True
        )
    # The message names no user either.
    for error in errors:
        assert "alice" not in (error.details() or "")
        assert "nobody-at-all" not in (error.details() or "")


async def test_unknown_user_still_costs_one_password_hash(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await server.create_user("carol")
    hasher: PasswordHasher = server.running.components.hasher
    verified: list[str] = []
    real_verify = hasher._verify

    def counting_verify(password_hash: str, password: str) -> bool:
        verified.append(password_hash)
        return real_verify(password_hash, password)

    monkeypatch.setattr(hasher, "_verify", counting_verify)

    await expect_error(issue(server, "no-such-user"), Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert len(verified) == 1
    assert verified[0].startswith("$argon2id$")

    await expect_error(
        issue(server, "carol", WRONG_PASSWORD),
        Code.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
        secret_values=[WRONG_PASSWORD],
    )
    assert len(verified) == 2
    # The dummy hash costs what a real one does: the same argon2 parameters.
    assert verified[0].split("$")[:4] == verified[1].split("$")[:4]


async def test_issue_scopes_must_be_held_and_a_subset_is_granted_exactly(
    server: LiveServer,
) -> None:
    await server.create_user("dave", scopes=("read", "write"))

    await expect_error(
        issue(server, "dave", scopes=("read", "admin")),
        Code.PERMISSION_DENIED,
        "SCOPE_NOT_ALLOWED",
    )
    await expect_error(
        issue(server, "dave", scopes=("admin",)), Code.PERMISSION_DENIED, "SCOPE_NOT_ALLOWED"
    )

    subset = await server.login("dave", scopes=("write",))
    assert list(subset.scopes) == ["write"]
    verdict = await validate(server, subset.access_token)
    assert verdict.valid
    assert list(verdict.scopes) == ["write"]
    lacking = await validate(server, subset.access_token, required_scopes=["read"])
    assert not lacking.valid
    assert lacking.error == auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE
    # A refresh keeps exactly the granted subset.
    rotated = (await refresh(server, subset.refresh_token)).tokens
    assert list(rotated.scopes) == ["write"]

    everything = await server.login("dave")
    assert sorted(everything.scopes) == ["read", "write"]
    verdict = await validate(server, everything.access_token, required_scopes=["read", "write"])
    assert verdict.valid
    assert sorted(verdict.scopes) == ["read", "write"]


# Refresh: INVALID, EXPIRED, SESSION_REVOKED, REUSED


async def test_refresh_with_unknown_malformed_or_foreign_token_is_invalid(
    server: LiveServer,
) -> None:
    await server.create_user("erin")
    pair = await server.login("erin")

    unknown = secrets.token_urlsafe(32)
    assert len(unknown) == 43
    flipped = ("B" if pair.refresh_token[0] == "A" else "A") + pair.refresh_token[1:]
    candidates = [
        unknown,  # well-formed, never issued
        flipped,  # one character off a real token
        pair.refresh_token[:-1],  # 42 characters
        pair.refresh_token + "A",  # 44 characters
        "not a refresh token!",
        "=" * 43,
        pair.access_token,  # an access token is not a refresh token
    ]
    for token in candidates:
        await expect_error(
            refresh(server, token),
            Code.UNAUTHENTICATED,
            "REFRESH_TOKEN_INVALID",
            secret_values=[token, pair.refresh_token, pair.access_token],
        )
    # None of that harmed the real token.
    rotated = (await refresh(server, pair.refresh_token)).tokens
    assert rotated.session_id == pair.session_id


async def test_refresh_past_idle_expiry_is_expired(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(refresh_idle_ttl=60)
    await server.create_user("frank")
    pair = await server.login("frank")

    clock.advance(59)
    child = (await refresh(server, pair.refresh_token)).tokens  # still within its idle TTL

    clock.advance(61)
    await expect_error(
        refresh(server, child.refresh_token),
        Code.UNAUTHENTICATED,
        "REFRESH_TOKEN_EXPIRED",
        secret_values=[child.refresh_token],
    )


async def test_refresh_past_absolute_expiry_is_expired(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(refresh_idle_ttl=60, refresh_absolute_ttl=100)
    await server.create_user("gina")
    pair = await server.login("gina")

    clock.advance(50)
    child = (await refresh(server, pair.refresh_token)).tokens
    clock.advance(45)
    grandchild = (await refresh(server, child.refresh_token)).tokens  # idle-fresh, t=95

    clock.advance(10)  # t=105: only 10 s idle, but the session is 105 s old
    await expect_error(
        refresh(server, grandchild.refresh_token),
        Code.UNAUTHENTICATED,
        "REFRESH_TOKEN_EXPIRED",
        secret_values=[grandchild.refresh_token],
    )


async def test_refresh_after_revoke_is_session_revoked(server: LiveServer) -> None:
    await server.create_user("hank")
    pair = await server.login("hank")
    revoked = await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token))
    assert revoked.revoked_sessions == 1
    await expect_error(
        refresh(server, pair.refresh_token),
        Code.UNAUTHENTICATED,
        "SESSION_REVOKED",
        secret_values=[pair.refresh_token],
    )

    # Revoking by access token ends the session for its refresh token, too.
    other = await server.login("hank")
    revoked = await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=other.access_token))
    assert revoked.revoked_sessions == 1
    await expect_error(
        refresh(server, other.refresh_token),
        Code.UNAUTHENTICATED,
        "SESSION_REVOKED",
        secret_values=[other.refresh_token, other.access_token],
    )


async def test_refresh_reuse_with_grace_off_is_reused(server_factory: ServerFactory) -> None:
    server = await server_factory(refresh_reuse_grace=0)
    await server.create_user("iris")
    pair = await server.login("iris")
    child = (await refresh(server, pair.refresh_token)).tokens

    await expect_error(
        refresh(server, pair.refresh_token),
        Code.UNAUTHENTICATED,
        "REFRESH_TOKEN_REUSED",
        secret_values=[pair.refresh_token, child.refresh_token],
    )
    # The call revoked the session: the unused child is dead too.
    await expect_error(
        refresh(server, child.refresh_token),
        Code.UNAUTHENTICATED,
        "SESSION_REVOKED",
        secret_values=[child.refresh_token],
    )


async def test_refresh_reuse_after_the_grace_window_is_reused(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("jack")
    pair = await server.login("jack")
    await refresh(server, pair.refresh_token)
    clock.advance(server.settings.refresh_reuse_grace + 1)
    await expect_error(
        refresh(server, pair.refresh_token),
        Code.UNAUTHENTICATED,
        "REFRESH_TOKEN_REUSED",
        secret_values=[pair.refresh_token],
    )


# Revoke by session_id / subject: caller checks


async def test_revoke_by_session_or_subject_checks_the_caller(server: LiveServer) -> None:
    kate = await server.create_user("kate")
    await server.create_user("liam")
    kate_pair = await server.login("kate")
    liam_pair = await server.login("liam")
    garbage = "garbage." + secrets.token_urlsafe(24)
    tokens = [kate_pair.access_token, liam_pair.access_token, garbage]

    targets = [
        auth_pb2.RevokeRequest(session_id=kate_pair.session_id),
        auth_pb2.RevokeRequest(subject=str(kate.id)),
    ]
    for request in targets:
        await expect_error(
            server.stub.Revoke(request),
            Code.UNAUTHENTICATED,
            "CALLER_UNAUTHENTICATED",
            secret_values=tokens,
        )
        for metadata in [
            bearer(garbage),
            (("authorization", f"Basic {kate_pair.access_token}"),),
            (("authorization", "Bearer"),),
            (("authorization", kate_pair.access_token),),
        ]:
            await expect_error(
                server.stub.Revoke(request, metadata=metadata),
                Code.UNAUTHENTICATED,
                "CALLER_UNAUTHENTICATED",
                secret_values=tokens,
            )
        # Another user's live token: the same answer (no oracle for live tokens).
        await expect_error(
            server.stub.Revoke(request, metadata=bearer(liam_pair.access_token)),
            Code.UNAUTHENTICATED,
            "CALLER_UNAUTHENTICATED",
            secret_values=tokens,
        )

    # None of the refused calls revoked anything.
    assert (await validate(server, kate_pair.access_token)).valid
    # The owner's own token passes both checks.
    done = await server.stub.Revoke(
        auth_pb2.RevokeRequest(session_id=kate_pair.session_id),
        metadata=bearer(kate_pair.access_token),
    )
    assert done.revoked_sessions == 1
    # Her token is now revoked, so it no longer authenticates a caller.
    await expect_error(
        server.stub.Revoke(
            auth_pb2.RevokeRequest(subject=str(kate.id)), metadata=bearer(kate_pair.access_token)
        ),
        Code.UNAUTHENTICATED,
        "CALLER_UNAUTHENTICATED",
        secret_values=tokens,
    )
    # Liam's session is untouched by all of this.
    assert (await validate(server, liam_pair.access_token)).valid


async def test_revoke_unknown_session_with_a_valid_caller_is_refused(
    server: LiveServer,
) -> None:
    await server.create_user("mona")
    pair = await server.login("mona")
    for session_id in ["00000000-0000-0000-0000-000000000000", "not-a-uuid"]:
        await expect_error(
            server.stub.Revoke(
                auth_pb2.RevokeRequest(session_id=session_id), metadata=bearer(pair.access_token)
            ),
            Code.UNAUTHENTICATED,
            "CALLER_UNAUTHENTICATED",
            secret_values=[pair.access_token],
        )


# PostgreSQL unreachable


@pytest.mark.system  # its own PostgreSQL, stopped under the server
async def test_database_unreachable_is_unavailable(
    throwaway_pg_dir: Path, tmp_path: Path, clock: ManualClock
) -> None:
    pg_dir = throwaway_pg_dir
    uri = await start_migrated(pg_dir)
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=uri,
        data_dir=tmp_path / "data",
        kek=TEST_KEK,
        db_timeout=2.0,
    )
    live = await start_live_server(settings, clock)
    stopped = False
    try:
        await live.create_user("nina")
        pair = await live.login("nina")  # all is well while PostgreSQL runs
        await asyncio.to_thread(stop_embedded_postgres, pg_dir)
        stopped = True

        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: live.stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username="nina", password=PASSWORD)
                ),
                timeout=15,
            ),
            lambda: live.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=pair.refresh_token), timeout=15
            ),
            lambda: live.stub.Revoke(
                auth_pb2.RevokeRequest(refresh_token=pair.refresh_token), timeout=15
            ),
        ]
        for make_call in calls:
            started = time.monotonic()
            await expect_error(
                make_call(),
                Code.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                secret_values=[pair.refresh_token, pair.access_token],
            )
            elapsed = time.monotonic() - started
            assert elapsed < 10, f"took {elapsed:.1f}s to report the outage"

        # Validate may answer from memory (revocations are pushed to each server), but
        # when it does need the database it says so the same way: never INTERNAL/UNKNOWN.
        try:
            verdict = await live.stub.Validate(
                auth_pb2.ValidateRequest(access_token=pair.access_token), timeout=15
            )
            assert verdict.valid
        except grpc.aio.AioRpcError as error:
            assert_error(error, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert_no_secrets(error, [pair.access_token])
    finally:
        await stop_live_server(live)
        if not stopped:
            with contextlib.suppress(subprocess.CalledProcessError):
                await asyncio.to_thread(stop_embedded_postgres, pg_dir)


# Limits: tokens (8 KiB)

TOKENS_AT_LIMIT = ["A" * MAX_TOKEN, "é" * (MAX_TOKEN // 2)]
TOKENS_OVER_LIMIT = ["A" * (MAX_TOKEN + 1), "é" * (MAX_TOKEN // 2) + "A", "€" * 2731]


async def test_validate_access_token_limit(server: LiveServer) -> None:
    for token in TOKENS_AT_LIMIT:
        verdict = await validate(server, token)
        assert not verdict.valid
        assert verdict.error == auth_pb2.VALIDATION_ERROR_MALFORMED
    for token in TOKENS_OVER_LIMIT:
        await expect_invalid(validate(server, token), "access_token", secret_values=[token])


async def test_refresh_token_limit(server: LiveServer) -> None:
    for token in TOKENS_AT_LIMIT:
        await expect_error(
            refresh(server, token),
            Code.UNAUTHENTICATED,
            "REFRESH_TOKEN_INVALID",
            secret_values=[token],
        )
    for token in TOKENS_OVER_LIMIT:
        await expect_invalid(refresh(server, token), "refresh_token", secret_values=[token])


@pytest.mark.parametrize("field", ["refresh_token", "access_token"])
async def test_revoke_token_limit(server: LiveServer, field: str) -> None:
    for token in TOKENS_AT_LIMIT:
        response = await server.stub.Revoke(auth_pb2.RevokeRequest(**{field: token}))
        assert response.revoked_sessions == 0
    for token in TOKENS_OVER_LIMIT:
        await expect_invalid(
            server.stub.Revoke(auth_pb2.RevokeRequest(**{field: token})),
            field,
            secret_values=[token],
        )


@pytest.mark.parametrize("field", ["session_id", "subject"])
async def test_revoke_id_limit(server: LiveServer, field: str) -> None:
    for value in ["0" * MAX_ID, "é" * (MAX_ID // 2)]:
        await expect_error(
            server.stub.Revoke(auth_pb2.RevokeRequest(**{field: value})),
            Code.UNAUTHENTICATED,
            "CALLER_UNAUTHENTICATED",
        )
    for value in ["0" * (MAX_ID + 1), "é" * (MAX_ID // 2) + "0"]:
        await expect_invalid(server.stub.Revoke(auth_pb2.RevokeRequest(**{field: value})), field)


# Limits: username (256 bytes) and password (1 KiB)


async def test_username_limit_counts_bytes(server: LiveServer) -> None:
    at_limit = ["😀" * (MAX_USERNAME // 4), "é" * (MAX_USERNAME // 2), "u" * MAX_USERNAME]
    for name in at_limit:
        assert len(name.encode()) == MAX_USERNAME
    await server.create_user(at_limit[0])
    await server.create_user(at_limit[1])
    for name in at_limit[:2]:
        pair = await server.login(name)
        assert (await validate(server, pair.access_token)).valid
    # Unknown, but not too long: an ordinary credentials failure.
    await expect_error(issue(server, at_limit[2]), Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")

    over = [
        "😀" * (MAX_USERNAME // 4) + "u",  # 65 characters, 257 bytes
        "é" * (MAX_USERNAME // 2) + "u",
        "€" * 86,  # 86 characters, 258 bytes
        "u" * (MAX_USERNAME + 1),
    ]
    for name in over:
        assert len(name.encode()) > MAX_USERNAME
        await expect_invalid(issue(server, name), "password.username")


async def test_password_limit_counts_bytes(server: LiveServer) -> None:
    at_limit = "ü" * (MAX_PASSWORD // 2)
    assert len(at_limit.encode()) == MAX_PASSWORD
    await server.create_user("olga", password=at_limit)
    pair = await server.login("olga", password=at_limit)
    assert (await validate(server, pair.access_token)).valid
    ascii_at_limit = "p" * MAX_PASSWORD
    await not_invalid(issue(server, "olga", ascii_at_limit), secret_values=[ascii_at_limit])

    over = [at_limit + "x", "€" * 342, "p" * (MAX_PASSWORD + 1)]
    for password in over:
        assert len(password.encode()) > MAX_PASSWORD
        await expect_invalid(
            issue(server, "olga", password), "password.password", secret_values=[password]
        )


# Limits: scopes (32 of 128 bytes) and audience (256 bytes)


async def test_scope_count_limit(server: LiveServer) -> None:
    scopes = tuple(f"scope-{i:02d}" for i in range(MAX_SCOPES))
    await server.create_user("pete", scopes=scopes)
    pair = await server.login("pete", scopes=scopes)
    assert sorted(pair.scopes) == sorted(scopes)
    verdict = await validate(server, pair.access_token, required_scopes=scopes)
    assert verdict.valid

    too_many = (*scopes, "scope-32")
    await expect_invalid(issue(server, "pete", scopes=too_many), "scopes")
    await expect_invalid(
        validate(server, pair.access_token, required_scopes=too_many),
        "required_scopes",
        secret_values=[pair.access_token],
    )


async def test_scope_length_limit(server: LiveServer) -> None:
    long_scope = "s" * MAX_SCOPE
    await server.create_user("quinn", scopes=("read", long_scope))
    pair = await server.login("quinn", scopes=(long_scope,))
    assert list(pair.scopes) == [long_scope]
    assert (await validate(server, pair.access_token, required_scopes=[long_scope])).valid

    too_long = "s" * (MAX_SCOPE + 1)
    await expect_invalid(issue(server, "quinn", scopes=["read", too_long]), "scopes[1]")
    await expect_invalid(
        validate(server, pair.access_token, required_scopes=[too_long, "read"]),
        "required_scopes[0]",
        secret_values=[pair.access_token],
    )


async def test_audience_limit_counts_bytes(server_factory: ServerFactory) -> None:
    # Issue grants only configured audiences: these are, up to the limit.
    server = await server_factory(
        audiences=frozenset({"a" * MAX_AUDIENCE, "é" * (MAX_AUDIENCE // 2)})
    )
    await server.create_user("rita")
    for audience in ["a" * MAX_AUDIENCE, "é" * (MAX_AUDIENCE // 2)]:
        pair = await server.login("rita", audience=audience)
        assert (await validate(server, pair.access_token, audience=audience)).valid

    pair = await server.login("rita")
    for audience in ["a" * (MAX_AUDIENCE + 1), "é" * (MAX_AUDIENCE // 2) + "a"]:
        await expect_invalid(issue(server, "rita", audience=audience), "audience")
        await expect_invalid(
            validate(server, pair.access_token, audience=audience),
            "audience",
            secret_values=[pair.access_token],
        )


# Required fields


@dataclass(frozen=True)
class EmptyCase:
    name: str
    call: Callable[[LiveServer], Awaitable[Any]]
    field: str
    only: bool = True


def _issue_request(request: auth_pb2.IssueRequest) -> Callable[[LiveServer], Awaitable[Any]]:
    return lambda server: server.stub.Issue(request)


def _revoke_request(request: auth_pb2.RevokeRequest) -> Callable[[LiveServer], Awaitable[Any]]:
    return lambda server: server.stub.Revoke(request)


EMPTY_CASES = [
    EmptyCase(
        "issue-empty-username",
        _issue_request(
            auth_pb2.IssueRequest(password=auth_pb2.PasswordCredentials(password=PASSWORD))
        ),
        "password.username",
    ),
    EmptyCase(
        "issue-empty-password",
        _issue_request(
            auth_pb2.IssueRequest(password=auth_pb2.PasswordCredentials(username="someone"))
        ),
        "password.password",
    ),
    EmptyCase("issue-no-credentials", _issue_request(auth_pb2.IssueRequest()), "password", False),
    EmptyCase(
        "issue-no-credentials-with-scopes",
        _issue_request(auth_pb2.IssueRequest(scopes=["read"], audience="x")),
        "password",
        False,
    ),
    EmptyCase(
        "issue-empty-scope-entry",
        _issue_request(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username="someone", password=PASSWORD),
                scopes=["read", ""],
            )
        ),
        "scopes[1]",
    ),
    EmptyCase(
        "refresh-empty",
        lambda server: server.stub.Refresh(auth_pb2.RefreshRequest()),
        "refresh_token",
    ),
    EmptyCase(
        "validate-empty",
        lambda server: server.stub.Validate(auth_pb2.ValidateRequest(required_scopes=["read"])),
        "access_token",
    ),
    EmptyCase("revoke-no-target", _revoke_request(auth_pb2.RevokeRequest()), "target"),
    EmptyCase(
        "revoke-empty-refresh-token",
        _revoke_request(auth_pb2.RevokeRequest(refresh_token="")),
        "refresh_token",
    ),
    EmptyCase(
        "revoke-empty-access-token",
        _revoke_request(auth_pb2.RevokeRequest(access_token="")),
        "access_token",
    ),
    EmptyCase(
        "revoke-empty-session-id",
        _revoke_request(auth_pb2.RevokeRequest(session_id="")),
        "session_id",
    ),
    EmptyCase(
        "revoke-empty-subject", _revoke_request(auth_pb2.RevokeRequest(subject="")), "subject"
    ),
]


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c.name for c in EMPTY_CASES])
async def test_empty_required_field_is_invalid_argument(
    server: LiveServer, case: EmptyCase
) -> None:
    await expect_invalid(case.call(server), case.field, only=case.only)


async def test_unset_credentials_name_only_password_fields(server: LiveServer) -> None:
    fields = await expect_invalid(
        server.stub.Issue(auth_pb2.IssueRequest()), "password", only=False
    )
    assert set(fields) <= {"password", "password.username", "password.password"}


# Requests that are not valid protobuf

INVALID_UTF8 = b"\x0a\x04\x0a\x02\xff\xfe"  # field 1 → field 1: a string of bytes ff fe
TRUNCATED = b"\x0a\x10abc"  # field 1 claims 16 bytes, 3 follow
BAD_TAG = b"\xff\xff\xff"

UNDECODABLE = [
    ("Issue", INVALID_UTF8),
    ("Issue", b"\x0a\x04\x12\x02\xff\xfe"),  # password.password not UTF-8
    ("Issue", b"\x12\x02\xff\xfe"),  # scopes[0] not UTF-8
    ("Refresh", INVALID_UTF8),
    ("Refresh", b"\x0a\x02\xff\xfe"),
    ("Validate", INVALID_UTF8),
    ("Validate", b"\x12\x02\xff\xfe"),  # required_scopes[0] not UTF-8
    ("Revoke", INVALID_UTF8),
    ("Revoke", b"\x1a\x02\xff\xfe"),  # session_id not UTF-8
    *[(rpc, TRUNCATED) for rpc in ("Issue", "Refresh", "Validate", "Revoke", "GetJwks")],
    *[(rpc, BAD_TAG) for rpc in ("Issue", "Refresh", "Validate", "Revoke", "GetJwks")],
]


def _raw(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    ("rpc", "payload"), UNDECODABLE, ids=[f"{r}-{p.hex()}" for r, p in UNDECODABLE]
)
async def test_undecodable_request_is_invalid_argument(
    server: LiveServer, rpc: str, payload: bytes
) -> None:
    call = server.channel.unary_unary(
        f"/auth.v1.AuthService/{rpc}", request_serializer=_raw, response_deserializer=_raw
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(payload, timeout=10)
    error = caught.value
    assert error.code() not in (Code.INTERNAL, Code.UNKNOWN), error.details()
    assert_error(error, Code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(error)


async def test_the_raw_channel_reaches_the_service(server: LiveServer) -> None:
    """Control for the test above: the same raw path answers a well-formed request."""
    call = server.channel.unary_unary(
        "/auth.v1.AuthService/GetJwks", request_serializer=_raw, response_deserializer=_raw
    )
    answer = auth_pb2.GetJwksResponse.FromString(await call(b"", timeout=10))
    assert '"keys"' in answer.jwks_json
    # Unknown fields in valid protobuf are not an error.
    answer = auth_pb2.GetJwksResponse.FromString(await call(b"\x0a\x02hi", timeout=10))
    assert '"keys"' in answer.jwks_json


async def test_a_request_over_the_message_limit_is_resource_exhausted(
    server_factory: ServerFactory,
) -> None:
    """Whole requests are capped (AUTH_MAX_MESSAGE_BYTES, default 64 KiB): far above any
    valid request, so a flood of huge messages cannot exhaust memory."""
    server = await server_factory(max_message_bytes=32 * 1024)
    cap = server.settings.max_message_bytes
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Validate(auth_pb2.ValidateRequest(access_token="a" * (cap + 1)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the cap, the request reaches the service and gets its own answer.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Validate(auth_pb2.ValidateRequest(access_token="a" * (cap - 100)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server is still up.
    assert (await server.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json


async def test_calls_over_the_concurrency_limit_are_refused_not_queued(
    server_factory: ServerFactory,
) -> None:
    """AUTH_MAX_CONCURRENT_RPCS: beyond it, unary calls get RESOURCE_EXHAUSTED /
    TOO_MANY_CALLS at once."""
    server = await server_factory(max_concurrent_rpcs=2)
    await server.create_user("busy")
    results = await asyncio.gather(
        *(server.login("busy") for _ in range(12)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if isinstance(r, auth_pb2.TokenPair)]
    assert served, "some logins must get through"
    assert refused, "with 12 logins at once and a limit of 2, some must be refused"
    for error in refused:
        assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS")
    assert len(served) + len(refused) == 12
    # Once the burst is over, the server serves again.
    await server.login("busy")


async def test_nul_characters_are_invalid_arguments(server: LiveServer) -> None:
    """NUL is valid UTF-8 but PostgreSQL text cannot hold it: refused up front, never INTERNAL."""
    credentials = auth_pb2.PasswordCredentials(username="a\x00b", password="x")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Issue(auth_pb2.IssueRequest(password=credentials))
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(caught.value) == ["password.username"]
    await server.create_user("nul-audience")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("nul-audience", audience="aud\x00")
    assert bad_request_fields(caught.value) == ["audience"]


async def test_pool_exhaustion_is_unavailable_not_a_hang(server_factory: ServerFactory) -> None:
    """With every pooled connection busy, a call waits AUTH_DB_TIMEOUT at most, then fails
    with UNAVAILABLE / DATABASE_UNAVAILABLE."""
    server = await server_factory(db_pool_size=2, db_timeout=0.5)
    await server.create_user("pooled")
    pair = await server.login("pooled")
    held = [await server.pool.acquire() for _ in range(2)]  # the server's own pool
    try:
        started = time.monotonic()
        await expect_error(
            server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        assert time.monotonic() - started < 3.0
    finally:
        for conn in held:
            await server.pool.release(conn)
    # Connections back: the same token still works (nothing was half done).
    assert (await refresh(server, pair.refresh_token)).tokens.session_id == pair.session_id


async def test_a_database_call_over_its_timeout_is_unavailable(
    server_factory: ServerFactory, database_url: str
) -> None:
    """A statement stuck behind a lock is abandoned after AUTH_DB_TIMEOUT."""
    import hashlib

    server = await server_factory(db_timeout=0.5)
    await server.create_user("stuck")
    pair = await server.login("stuck")
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(
            "SELECT 1 FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
            hashlib.sha256(pair.refresh_token.encode()).digest(),
        )
        started = time.monotonic()
        await expect_error(
            server.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=pair.refresh_token), timeout=10
            ),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        assert time.monotonic() - started < 3.0
        await transaction.rollback()
    finally:
        await blocker.close()
    assert (await refresh(server, pair.refresh_token)).tokens.session_id == pair.session_id


async def test_a_call_whose_deadline_passes_stops_its_database_work(
    server: LiveServer, database_url: str
) -> None:
    """The client's deadline cancels the call on the server, and its query with it: the
    server's backend stops waiting at once, and nothing is left half done."""
    import hashlib

    await server.create_user("late")
    pair = await server.login("late")
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(
            "SELECT 1 FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
            hashlib.sha256(pair.refresh_token.encode()).digest(),
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=pair.refresh_token), timeout=0.3
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 2.0
        while await blocker.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE wait_event_type = 'Lock' AND datname = current_database()"""
        ):
            assert time.monotonic() < deadline, "the server's query kept waiting"
            await asyncio.sleep(0.05)
        await transaction.rollback()
    finally:
        await blocker.close()
    assert (await refresh(server, pair.refresh_token)).tokens.session_id == pair.session_id
