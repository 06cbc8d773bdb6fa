"""The real server started on port 0 in the test's event loop and reached over gRPC with
the generated stubs (`LiveServer`), and what tests share with it: the test KEK, the default
password, and the record of every secret that went through its channel (`SecretsSeen`, which
the autouse fixture in conftest.py searches the logs for).

Fixtures wrapping these (`server`, `server_factory`, `secrets_seen`, ...) are in conftest.py;
tests import the types and helpers from here.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf.message import Message

from service.clock import ManualClock
from service.database import create_pool
from service.domain.records import UserRecord
from service.server import RunningServer, start_server
from service.settings import Settings

TEST_KEK = bytes(range(32))
PASSWORD = "correct horse battery staple"


def database_uri(base_uri: str, name: str) -> str:
    """`base_uri` pointing at database `name` instead."""
    parts = urlsplit(base_uri)
    return urlunsplit(parts._replace(path="/" + name))


class SecretsSeen:
    """Every password a test sent and every token it received through a LiveServer's
    channel, so that the test's captured logs can be searched for them afterwards."""

    FIELDS = frozenset({"password", "access_token", "refresh_token"})
    MIN_LENGTH = 12  # shorter values ("x", "password") turn up in ordinary log text

    def __init__(self) -> None:
        self.values: set[str] = set()

    def record(self, message: object) -> None:
        if not isinstance(message, Message):
            return
        for field, value in message.ListFields():
            if isinstance(value, Message):
                self.record(value)
            elif (
                field.name in self.FIELDS
                and isinstance(value, str)
                and len(value) >= self.MIN_LENGTH
            ):
                self.values.add(value)

    def leaked_into(self, text: str) -> int:
        """How many recorded secrets appear in `text` (the secrets themselves are not
        repeated in the failure message)."""
        return sum(1 for value in self.values if value in text)


class _RecordSecrets(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, seen: SecretsSeen) -> None:
        self._seen = seen

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        self._seen.record(request)
        call = await continuation(client_call_details, request)
        # A failed call records nothing; the caller sees the error when it awaits the call.
        with contextlib.suppress(grpc.aio.AioRpcError):
            self._seen.record(await call)
        return call


@dataclass
class LiveServer:
    """A real server on a free port, with a channel and stub to call it."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    pool: asyncpg.Pool
    clock: ManualClock
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def create_user(
        self, username: str | None = None, *, password: str = PASSWORD, scopes: tuple[str, ...] = ()
    ) -> UserRecord:
        return await self.running.components.users.create(
            username or f"user-{uuid.uuid4().hex[:8]}", password, scopes
        )

    async def login(
        self,
        username: str,
        *,
        password: str = PASSWORD,
        scopes: tuple[str, ...] = (),
        audience: str = "",
    ) -> auth_pb2.TokenPair:
        response = await self.stub.Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username=username, password=password),
                scopes=list(scopes),
                audience=audience,
            )
        )
        return response.tokens


async def start_live_server(
    settings: Settings, clock: ManualClock, secrets_seen: SecretsSeen | None = None
) -> LiveServer:
    assert settings.database_url is not None
    # The same pool configuration as `authsvc serve` (sizes, per-call timeout).
    pool = await create_pool(settings.database_url, settings)
    try:
        running = await start_server(settings, dsn=settings.database_url, pool=pool, clock=clock)
    except BaseException:
        await pool.close()  # a server refused to start (the test may expect it)
        raise
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}",
        interceptors=[] if secrets_seen is None else [_RecordSecrets(secrets_seen)],
    )
    return LiveServer(
        running=running,
        channel=channel,
        stub=auth_pb2_grpc.AuthServiceStub(channel),
        pool=pool,
        clock=clock,
        settings=settings,
    )


async def stop_live_server(live: LiveServer) -> None:
    await live.channel.close()
    await live.running.stop(None)
    await live.pool.close()


class ServerFactory(Protocol):
    """Type of the `server_factory` fixture: `await server_factory(**settings_overrides)`."""

    async def __call__(self, **overrides: object) -> LiveServer: ...
