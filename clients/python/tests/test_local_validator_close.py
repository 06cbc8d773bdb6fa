"""LocalValidator.close() returns however the stream stands when it is called. It used to
hang for good when its cancellation met an update that had just arrived: Python 3.11's
`asyncio.wait_for` then returns the update and drops the cancellation, and the read loop
went on reading (heartbeats) without ever looking at `_closed`. Seen as `make bench` (and
its test) stalling at the end of the LocalValidator part until the server stopped and
ended the stream; here, with a stream whose next update is always there at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from authsvc_client.local_validator import LocalValidator

pytestmark = pytest.mark.timeout(60)


class _EndlessHeartbeats:
    """A WatchRevocations call whose next update (a heartbeat) is ready at once."""

    def __init__(self) -> None:
        self.reads = 0

    async def read(self) -> auth_pb2.RevocationUpdate:
        await asyncio.sleep(0)
        self.reads += 1
        return auth_pb2.RevocationUpdate()

    def cancel(self) -> bool:
        return True


class _Client:
    """What LocalValidator asks of its AuthClient to follow the stream."""

    def __init__(self) -> None:
        self.calls: list[_EndlessHeartbeats] = []

    def watch_revocations(self, after_sequence: int = 0) -> _EndlessHeartbeats:
        self.calls.append(_EndlessHeartbeats())
        return self.calls[-1]


@pytest.mark.parametrize("turns_before_close", range(12))
async def test_close_returns_while_updates_keep_arriving(turns_before_close: int) -> None:
    for _ in range(20):
        client: Any = _Client()
        validator = LocalValidator(client=client)
        validator.start_in_background()
        for _ in range(turns_before_close):
            await asyncio.sleep(0)
        closing = asyncio.ensure_future(validator.close())
        done, _ = await asyncio.wait({closing}, timeout=2)
        assert done, "close() did not return while heartbeats kept coming"
        reads = sum(call.reads for call in client.calls)
        await asyncio.sleep(0.01)
        assert sum(call.reads for call in client.calls) == reads  # nothing reads any more
