"""AUTH_WORKER_MAX_MEMORY: a worker whose memory grows past it is replaced. What grows it
here is the HPACK decompression bomb an outside review found in gRPC's C core (a 4,000-byte
header put in the HPACK table and referenced 16,000 times a frame: the worker keeps memory
for each frame, ~150 MB a second from one connection, and gives none back; docs/security.md,
"Known gaps in gRPC's C core"). No channel argument bounds it; the supervisor does."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import hpack
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.loadtest.server_process import ServeCommand, serving
from tests.test_cli import _server_env

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

CEILING_MIB = 300


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return header + payload


def _bomb(port: int, seconds: float, stop: threading.Event, per_second: int = 1000) -> int:
    """One connection sending the bomb, `per_second` frames a second, until `seconds` pass,
    the server closes the connection or `stop`; the frames sent."""
    head = hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/auth.v1.AuthService/GetJwks"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    block = (head + hpack.Encoder().encode([("x-big", "a" * 4000)]) + bytes([0x80 | 62]) * 16000)[
        :16384
    ]
    sent, stream = 0, 1
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        started = time.monotonic()
        while time.monotonic() - started < seconds and not stop.is_set():
            if sent > per_second * (time.monotonic() - started):
                time.sleep(0.002)
                continue
            stream += 2
            try:
                sock.sendall(_frame(1, 0x4 | 0x1, stream, block))  # END_HEADERS | END_STREAM
            except OSError:
                break  # the server closed it: the worker went
            sent += 1
    return sent


def _workers(supervisor: int) -> dict[int, int]:
    """pid -> resident MiB of each worker of `supervisor`."""
    found = {}
    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            found[child.pid] = child.memory_info().rss // (1024 * 1024)
    return found


def _jwks_answers(port: int, attempts: int = 3, failures: list[str] | None = None) -> bool:
    """GetJwks on a new connection, tried again on UNAVAILABLE as the clients' service
    config says (deploy/grpc-service-config.json): a stopping worker refuses calls that
    reach it after its drain with UNAVAILABLE (SHUTTING_DOWN) so that they are retried.
    `failures`: each failed attempt's status and details are added to it."""
    for _ in range(attempts):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                answer = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
                    auth_pb2.GetJwksRequest(), timeout=2
                )
            except grpc.RpcError as exc:
                if failures is not None:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return False
                continue
        return '"keys"' in answer.jwks_json
    return False


@pytest.mark.parametrize(
    ("count", "per_second"),
    [
        # Fast: ~150 MB a second, past 1.5 x the ceiling before its replacement serves.
        (2, 1000),
        # Slower, and stopped once the worker is being replaced: it drains, not killed.
        (1, 300),
    ],
)
def test_a_worker_past_its_memory_ceiling_is_replaced(
    database_url: str, tmp_path: Path, count: int, per_second: int
) -> None:
    """With one worker too: `--workers 1` ran without a supervisor, and nothing replaced
    it. A worker is told to stop once its replacement, started beside it, serves: a lone
    worker's port then keeps a listener, and no new connection is refused. One that keeps
    growing fast is killed past 1.5 x the ceiling, ready replacement or not."""
    env = _server_env(database_url, tmp_path, AUTH_WORKER_MAX_MEMORY=str(CEILING_MIB))
    log = tmp_path / "serve.log"
    with serving(ServeCommand(env, workers=count, stderr=log), at_end="kill") as server:
        before = _workers(server.process.pid)
        assert len(before) == count and max(before.values()) < CEILING_MIB
        unanswered: list[str] = []  # each unanswered probe's last failure
        probing = threading.Event()

        def probe() -> None:
            # New connections, one after another, while the worker is bombed and replaced.
            while not probing.is_set():
                failures: list[str] = []
                if not _jwks_answers(server.port, failures=failures):
                    unanswered.append(failures[-1] if failures else "answered without keys")
                time.sleep(0.05)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        stop = threading.Event()
        peak = 0
        bombing = threading.Thread(
            target=_bomb, args=(server.port, 45, stop, per_second), daemon=True
        )
        bombing.start()
        deadline = time.monotonic() + 60
        while True:
            workers = _workers(server.process.pid)
            peak = max([peak, *workers.values()])
            replaced = set(workers) - set(before)
            if replaced and not bombing.is_alive():
                break
            if count == 1 and "replacing it" in log.read_text():
                # How fast it grows depends on the CPU left to it: it must not pass 1.5 x
                # the ceiling before its replacement serves, whatever else runs.
                stop.set()
            assert time.monotonic() < deadline, f"no worker was replaced: {workers}"
            time.sleep(0.2)
        stop.set()
        bombing.join(10)
        # Bounded: killed at the latest a check after passing 1.5 x the ceiling.
        assert CEILING_MIB < peak < 4 * CEILING_MIB
        assert "over AUTH_WORKER_MAX_MEMORY=300: replacing it" in log.read_text()
        # The replaced worker drains (its replacement serving) and leaves.
        deadline = time.monotonic() + 20
        while len(workers := _workers(server.process.pid)) != count:
            assert time.monotonic() < deadline, f"the replaced worker stayed: {workers}"
            time.sleep(0.2)
        assert all(mib < CEILING_MIB for mib in workers.values())
        probing.set()
        prober.join(10)
        if count == 1:
            assert "killing it" not in log.read_text()
            # The port kept a listener: no probe was refused (UNAVAILABLE on every attempt).
            # What remains is gRPC's (docs/scaling.md, security.md): its stop ends a call it
            # received as the old worker stopped with CANCELLED (grpc/grpc#41785, about one a
            # stop), and a call that reached the bombed worker may miss its 2 s deadline on a
            # busy machine. Seen here beside another load: one of either in 6 of 34 runs.
            assert all(f.startswith(("CANCELLED", "DEADLINE_EXCEEDED")) for f in unanswered), (
                unanswered
            )
            assert len(unanswered) <= 2, unanswered
        assert _jwks_answers(server.port)
