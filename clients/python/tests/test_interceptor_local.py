"""RequireAccessToken with its LocalValidator against the fake authsvc: tokens are checked
in process, a pushed revocation is refused on the next call, and a stale validator (or one
not yet synced) asks authsvc's Validate."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from authsvc_client.client import AuthClient
from authsvc_client.interceptor import RequireAccessToken, current_principal
from authsvc_client.local_validator import LocalValidator
from fake_authsvc import FakeAuthsvc, ManualClock, until
from google.protobuf.wrappers_pb2 import StringValue

METHOD = "/example.Echo/Who"


async def who(request: StringValue, context: Any) -> StringValue:
    return StringValue(value=current_principal().subject)


class Service:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call = channel.unary_unary(
            METHOD, StringValue.SerializeToString, StringValue.FromString
        )

    async def who(self, token: str) -> str:
        answer: StringValue = await self._call(
            StringValue(), metadata=(("authorization", f"Bearer {token}"),)
        )
        return answer.value

    async def code(self, token: str) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.who(token)
        return caught.value.code()


@pytest.fixture
async def serve(fake: FakeAuthsvc) -> AsyncIterator[Any]:
    made: list[tuple[grpc.aio.Server, grpc.aio.Channel, RequireAccessToken, AuthClient]] = []

    async def start(**options: Any) -> tuple[Service, RequireAccessToken]:
        auth = AuthClient(target=fake.address)
        guard = RequireAccessToken(auth, {METHOD: ("read",)}, **options)
        server = grpc.aio.server(interceptors=[guard])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "example.Echo",
                    {
                        "Who": grpc.unary_unary_rpc_method_handler(
                            who,
                            request_deserializer=StringValue.FromString,
                            response_serializer=StringValue.SerializeToString,
                        )
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        made.append((server, channel, guard, auth))
        return Service(channel), guard

    yield start
    for server, channel, guard, auth in made:
        await channel.close()
        await server.stop(None)
        await guard.close()
        await auth.close()


async def test_the_default_guard_checks_locally_once_synced(
    fake: FakeAuthsvc, serve: Any, wall: ManualClock
) -> None:
    service, guard = await serve(clock=wall)
    token = fake.token(sub="ann", sid="s-ann")
    # the first call starts the validator; until its snapshot is in, authsvc answers
    assert await service.who(token) in ("from-remote", "ann")
    validator = guard.validator
    assert isinstance(validator, LocalValidator)
    await until(lambda: validator.fresh)
    asked = len(fake.validate_calls)
    assert await service.who(token) == "ann"
    assert await service.code(fake.token(scope="write")) == grpc.StatusCode.PERMISSION_DENIED
    assert await service.code("not-a-jwt") == grpc.StatusCode.UNAUTHENTICATED
    sequence = fake.revoke_session("s-ann")
    await until(lambda: validator.sequence == sequence)
    assert await service.code(token) == grpc.StatusCode.UNAUTHENTICATED
    assert len(fake.validate_calls) == asked  # none of these asked authsvc


async def test_a_given_fail_closed_validator_answers_unavailable_when_stale(
    fake: FakeAuthsvc, serve: Any, wall: ManualClock
) -> None:
    mono = ManualClock(time.monotonic())
    validator = LocalValidator(
        fake.address, fail_closed=True, max_staleness=1.0, clock=wall, monotonic=mono
    )
    await validator.start()
    try:
        service, _ = await serve(validator=validator)
        token = fake.token()
        assert await service.who(token) == "user-1"
        mono.advance(2)
        assert await service.code(token) == grpc.StatusCode.UNAVAILABLE
        assert fake.validate_calls == []
    finally:
        await validator.close()


async def test_a_stale_guard_asks_validate(fake: FakeAuthsvc, serve: Any) -> None:
    fake.watch_mode = "hold"  # connected, never a snapshot
    service, guard = await serve()
    assert await service.who(fake.token()) == "from-remote"
    assert guard.validator is not None
    assert guard.validator.fallbacks == 1
