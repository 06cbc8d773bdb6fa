"""The supervisor's hold on its port (`_reserve_port`): refused while something listens
there, taken while the port only has connections of an earlier server closing (TIME_WAIT),
as after a restart on a fixed port: the soak found a second replica, restarted on its port,
refused "Address already in use" (the hold was bound without SO_REUSEADDR)."""

from __future__ import annotations

import socket

import pytest

from service.failures import ConfigurationError
from service.supervisor import _reserve_port


def _time_wait_on_a_closed_port(*, reuse_port: bool = True) -> int:
    """A port nothing listens on whose server side of a connection is in TIME_WAIT (the
    server closed first), as a stopped worker leaves its clients' connections, or (without
    `reuse_port`) any other program that set only SO_REUSEADDR."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As gRPC binds a worker's port.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port: int = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    accepted.close()  # the server's FIN first: its side ends in TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    return port


def test_a_port_left_in_time_wait_by_a_stopped_server_is_taken() -> None:
    port = _time_wait_on_a_closed_port()
    address, holder = _reserve_port(f"127.0.0.1:{port}")
    try:
        assert address.port == port
    finally:
        holder.close()


def test_a_port_left_in_time_wait_by_another_program_is_taken() -> None:
    """Found by an outside-in review (2026-12-02): the supervisor's hold (SO_REUSEPORT
    alone) failed to bind beside the TIME_WAIT of a socket without SO_REUSEPORT, and the
    supervisor ended with a traceback (exit 70); its probe had found the port free."""
    port = _time_wait_on_a_closed_port(reuse_port=False)
    address, holder = _reserve_port(f"127.0.0.1:{port}")
    try:
        assert address.port == port
        # Our workers still bind beside the hold, as gRPC does.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        holder.close()


def test_a_port_something_listens_on_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with pytest.raises(ConfigurationError, match="cannot listen on"):
            _reserve_port(f"127.0.0.1:{port}")
    # Another server that set SO_REUSEADDR too (as gRPC does) is refused as well.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(ConfigurationError, match="cannot listen on"):
            _reserve_port(f"127.0.0.1:{other.getsockname()[1]}")


def test_a_port_another_supervisor_holds_is_refused_before_its_workers_listen() -> None:
    address, holder = _reserve_port("127.0.0.1:0")
    try:
        with pytest.raises(ConfigurationError, match="cannot listen on"):
            _reserve_port(str(address))
    finally:
        holder.close()
