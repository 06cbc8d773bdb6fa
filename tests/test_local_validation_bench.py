"""The bench's LocalValidator part (service/loadtest/local_validation.py), in miniature
against the real server: every figure is measured and reported, every cold check missed
the validator's cache, the memory probes ran. Speed is not asserted (`make bench` shows it).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from service.loadtest import local_validation
from service.loadtest.local_validation import (
    ColdCheck,
    MemoryFigures,
    ValidationSpeed,
    _measure_memory,
    _Streams,
    measure_speed,
    report_tables,
)
from tests.live_server import PASSWORD, LiveServer


async def test_speed_part_measures_every_rate_and_each_cold_check_misses(
    server: LiveServer,
) -> None:
    users = tuple([(await server.create_user()).username for _ in range(2)])
    speed = await measure_speed(
        server.address,
        users,
        PASSWORD,
        issuer=server.settings.issuer,
        concurrency=4,
        duration=0.2,
        cold_tokens=40,
        clock=server.clock.now,
    )
    assert speed.grpc_sequential > 0 and speed.grpc_concurrent > 0
    assert speed.hot > 0 and speed.cold > 0
    # Every cold check verified a signature (measure_speed raises if one hit the cache).
    assert speed.cold_misses >= 40
    c = speed.cold_check
    assert c.decode > 0 and c.signature > 0 and c.claims > 0
    assert c.verify_signed > 0 and c.validate > 0


async def test_memory_part_reads_the_server_and_a_validator_process(server: LiveServer) -> None:
    assert server.settings.database_url is not None
    memory = await _measure_memory(
        server.address,
        server.settings.database_url,
        os.getpid(),  # the server runs in this process
        revoked=2000,
        watchers=20,
        snapshot_watchers=2,
        settle=0.1,
    )
    assert memory.revoked == 2000 and memory.watchers == 20
    for rss in (memory.server_base, memory.server_watchers, memory.validator_revoked):
        assert rss > 10  # MiB: a Python process, read
    assert memory.validator_revoked >= memory.validator_base > 0


async def test_closing_the_streams_is_bounded_when_grpc_never_finishes_closing(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh-clone run's bench once waited until its test's timeout in this part. Closing
    1,000 streams is where grpc.aio is known to wait forever; each wait is bounded now."""
    streams = _Streams(server.address, channels=2)
    streams.open(4, after_sequence=0)
    await streams.until_synced(4, within=10)
    never = asyncio.Event()

    async def close_that_never_ends(grace: float | None = None) -> None:
        await never.wait()

    stuck = streams._channels[0]
    monkeypatch.setattr(stuck, "close", close_that_never_ends)
    monkeypatch.setattr(local_validation, "CLOSE_WITHIN", 0.3)
    started = time.monotonic()
    await asyncio.wait_for(streams.close(), 10)  # without the bound: TimeoutError here
    assert time.monotonic() - started < 5
    assert "a channel did not close" in capsys.readouterr().err
    monkeypatch.undo()
    await stuck.close()


def test_report_has_the_ratio_rows_and_their_targets() -> None:
    speed = ValidationSpeed(
        grpc_sequential=1000.0,
        grpc_concurrent=4000.0,
        concurrency=32,
        hot=300_000.0,
        cold=14_000.0,
        cold_misses=28_000,
        cold_check=ColdCheck(8.0, 47.0, 2.0, 60.0, 1e6 / 14_000),
    )
    memory = MemoryFigures(64, 120, 120, 143, 136, 137, 46, 74)
    tables = report_tables(speed, memory)
    # The denominator is the faster gRPC rate (4,000/s): 300,000 / 4,000 and 14,000 / 4,000.
    assert "| LocalValidator hot (verified-token cache hit) | 300,000 | " in tables
    assert "| 75.0 | ≥ 50 |" in tables
    assert "| 3.5 | ≥ 3 |" in tables
    assert "| signature (key lookup, low-s check, ES256 verify) | 47.0 | 66% |" in tables
    # 56 MiB over 100k entries; 23 MiB over 1,000 streams.
    assert "| server, 100k revoked sessions in the log | 64 | 120 | 587 bytes each |" in tables
    assert "| 24,117 bytes each |" in tables
