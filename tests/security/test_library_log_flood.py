"""Lines a client can make the libraries log (gRPC logs an ERROR with a traceback, three
times, for each call whose metadata is not UTF-8) are written once per window, with a
count of those held back: a cheap request cannot grow the logs at will."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.loadtest.server_process import ServeCommand, serving
from service.logs import RepeatedLibraryLines, WithheldRequestBytes
from tests.raw_http2 import raw_unary_call
from tests.test_cli import _server_env

GET_JWKS = "/auth.v1.AuthService/GetJwks"


def _record(name: str, msg: str = "Exception serializing message %s") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("x",), None)


def test_library_lines_are_let_through_once_per_window_with_the_count_held_back() -> None:
    clock = [0.0]
    limit = RepeatedLibraryLines(window=60.0, now=lambda: clock[0])
    assert limit.filter(_record("grpc._cython.cygrpc"))
    assert not any(limit.filter(_record("grpc._cython.cygrpc")) for _ in range(500))
    # Another message, another library logger, or our own lines are not held back.
    assert limit.filter(_record("grpc._cython.cygrpc", "another %s"))
    assert limit.filter(_record("service.app"))
    assert limit.filter(_record("service.app"))
    clock[0] = 61.0
    again = _record("grpc._cython.cygrpc")
    assert limit.filter(again)
    assert again.getMessage().endswith("(500 more like it held back)")


def test_asyncpg_pool_retries_during_an_outage_are_one_line_per_window() -> None:
    """asyncpg's pool logs a traceback for every failed attempt to restore its connection
    floor, for as long as PostgreSQL is down (seen in the soak's outages)."""
    limit = RepeatedLibraryLines(window=60.0, now=lambda: 0.0)
    message = "Failed to restore the pool connection floor; retrying %s"
    assert limit.filter(_record("asyncpg.pool", message))
    assert not any(limit.filter(_record("asyncpg.pool", message)) for _ in range(100))


def test_library_line_keys_are_bounded() -> None:
    limit = RepeatedLibraryLines(window=60.0, max_keys=8, now=lambda: 0.0)
    for n in range(1000):
        limit.filter(_record("grpc.x", f"message {n} %s"))
    assert len(limit._seen) <= 8


@pytest.mark.system
async def test_metadata_that_is_not_utf8_cannot_flood_the_server_log(
    database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    command = ServeCommand(_server_env(database_url, tmp_path), workers=1, stderr=log_path)
    with serving(command) as server:
        port = server.port
        before = len(log_path.read_text().splitlines())
        for _ in range(100):
            response = await raw_unary_call(
                port,
                GET_JWKS,
                auth_pb2.GetJwksRequest().SerializeToString(),
                [(b"x-anything", b"\xff\xfe")],
            )
            assert response.grpc_status is not None
        await asyncio.sleep(0.5)
        lines = log_path.read_text().splitlines()[before:]
        # Without the filter: a traceback of several lines, three times per call.
        assert len(lines) < 100, "\n".join(lines[:40])


def test_request_bytes_in_library_lines_are_withheld() -> None:
    """gRPC logs a metadata value that is not UTF-8 in full ('Invalid encoding on %s'):
    an `authorization` value is a live credential."""
    record = logging.LogRecord(
        "grpc._cython.cygrpc",
        logging.ERROR,
        __file__,
        1,
        "Invalid encoding on %s",
        (b"Bearer secret-credential\xff",),
        None,
    )
    assert WithheldRequestBytes().filter(record)
    assert "secret-credential" not in record.getMessage()
    assert "25 bytes" in record.getMessage()


@pytest.mark.system
async def test_a_credential_in_metadata_that_is_not_utf8_is_not_written_to_the_log(
    database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    command = ServeCommand(_server_env(database_url, tmp_path), workers=1, stderr=log_path)
    credential = "a-service-token-of-forty-characters-xyz0"
    with serving(command) as server:
        for method, request in (
            (GET_JWKS, auth_pb2.GetJwksRequest()),
            ("/auth.v1.AuthService/Validate", auth_pb2.ValidateRequest(access_token="x")),
        ):
            response = await raw_unary_call(
                server.port,
                method,
                request.SerializeToString(),
                [(b"authorization", f"Bearer {credential}".encode() + b"\xff")],
            )
            assert response.grpc_status is not None
        await asyncio.sleep(0.5)
        log = log_path.read_text()
    assert "Invalid encoding" in log  # the line is still written, without the value
    assert credential not in log


@pytest.mark.system
async def test_grpc_core_writes_no_lines_a_client_can_cause(
    database_url: str, tmp_path: Path
) -> None:
    """gRPC's C core logs to stderr outside Python's logging (not JSON, not rate-limited):
    one line per call whose `grpc-timeout` does not parse, for instance. The server keeps
    it quiet unless the operator sets GRPC_VERBOSITY."""
    log_path = tmp_path / "server.log"
    env = _server_env(database_url, tmp_path, AUTH_LOG_FORMAT="json")
    env.pop("GRPC_VERBOSITY", None)
    with serving(ServeCommand(env, workers=1, stderr=log_path)) as server:
        before = len(log_path.read_text().splitlines())
        for n in range(20):
            response = await raw_unary_call(
                server.port,
                GET_JWKS,
                auth_pb2.GetJwksRequest().SerializeToString(),
                [(b"grpc-timeout", f"{n}Sx".encode())],
            )
            assert response.grpc_status is not None
        await asyncio.sleep(0.5)
        lines = log_path.read_text().splitlines()[before:]
    assert len(lines) < 5, "\n".join(lines[:10])
    for line in lines:
        json.loads(line)  # every line the server writes is one JSON object
