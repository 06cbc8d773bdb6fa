"""The listening sockets gRPC opened for our port, found among this process's file
descriptors, so that a stopping server can stop accepting connections before it refuses
its last calls.

grpc.aio has no call that closes its listeners and leaves the server running: its stop
also sends GOAWAY and ends the calls it received but had not handed to us yet (CANCELLED,
grpc/grpc#41785). While a stopping worker refuses calls (UNAVAILABLE, `RunningServer.stop`)
its port would otherwise still take new connections, about half of them with a worker
beside it on the port (SO_REUSEPORT: a replacement, a sibling), only to refuse every call
on them. Shut down (SHUT_RD), a listening socket leaves the port's group at once: new
connections go to the other listeners, or are refused if there is none; connections
already open are untouched. gRPC's acceptor then fails once and logs it
("Failed accept4: Invalid argument"), which docs/operations.md explains.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator

_FD_DIRECTORY = "/proc/self/fd"


def _sockets() -> Iterator[tuple[int, socket.socket]]:
    """(inode, a socket object on a duplicate of the descriptor) for each socket this
    process holds; the caller closes each (the duplicate only). Descriptors opened or
    closed meanwhile by other threads are skipped or looked at under their new identity:
    the inode is read from the duplicate itself."""
    for name in os.listdir(_FD_DIRECTORY):
        try:
            duplicate = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile (or the directory's own descriptor)
        try:
            inode_and_mode = os.fstat(duplicate)
            if not stat.S_ISSOCK(inode_and_mode.st_mode):
                os.close(duplicate)
                continue
            yield inode_and_mode.st_ino, socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)


def listening_tcp_sockets(port: int | None = None) -> frozenset[int]:
    """The inodes of the TCP sockets this process listens on, on `port` or on any."""
    found = set()
    for inode, sock in _sockets():
        with sock:
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and (port is None or sock.getsockname()[1] == port)
                ):
                    found.add(inode)
            except OSError:
                continue
    return frozenset(found)


def stop_accepting(inodes: frozenset[int]) -> int:
    """Shut down the listening sockets with these inodes; how many were (a socket held
    under several descriptors counts once)."""
    closed = set()
    for inode, sock in _sockets():
        with sock:
            if inode not in inodes or inode in closed:
                continue
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError as error:
                if error.errno != errno.ENOTCONN:  # already shut down
                    raise
            closed.add(inode)
    return len(closed)
