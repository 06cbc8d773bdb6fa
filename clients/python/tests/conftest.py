"""Fixtures of the package's own tests: an in-process fake authsvc on port 0 (fake_authsvc.py)
and a manual clock. Nothing here imports the server package."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2_grpc
from authsvc_client.local_validator import LocalValidator
from fake_authsvc import FakeAuthsvc, ManualClock, ValidatorFactory


@pytest.fixture
def wall() -> ManualClock:
    return ManualClock(time.time())


@pytest.fixture
def mono() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
async def fake(wall: ManualClock) -> AsyncIterator[FakeAuthsvc]:
    servicer = FakeAuthsvc(clock=wall)
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    await server.stop(None)


@pytest.fixture
async def make_validator(
    fake: FakeAuthsvc, wall: ManualClock, mono: ManualClock
) -> AsyncIterator[ValidatorFactory]:
    """`await make_validator(start=True, **options)`: a LocalValidator on the fake, on the
    manual clocks unless the options say otherwise; closed at the end."""
    made: list[LocalValidator] = []

    async def make(*, start: bool = True, **options: Any) -> LocalValidator:
        options.setdefault("clock", wall)
        options.setdefault("monotonic", mono)
        validator = LocalValidator(fake.address, **options)
        made.append(validator)
        if start:
            await validator.start(timeout=10)
        return validator

    yield make
    for validator in made:
        await validator.close()
