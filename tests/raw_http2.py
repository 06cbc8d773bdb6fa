"""A gRPC call written by hand on a bare HTTP/2 connection, for what no gRPC client will
send: header values with NUL, control or non-ASCII bytes (grpc's own clients refuse them,
a hostile client does not)."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x4, 0x7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK "literal header field without indexing, new name", no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


@dataclass
class RawResponse:
    grpc_status: int | None
    """The grpc-status trailer (None if the server sent none we could read)."""
    message: bytes | None
    """The response message (None when the call failed)."""


def _grpc_status(block: bytes) -> int | None:
    # grpc-core sends grpc-status as a literal with a plain (not Huffman-coded) name and
    # value on a fresh connection; enough for these tests, which open one per call.
    at = block.find(b"\x0bgrpc-status")
    if at < 0:
        return None
    length = block[at + 12]
    if length & 0x80:
        return None  # Huffman-coded: not read here
    return int(block[at + 13 : at + 13 + length])


async def raw_unary_call(
    port: int, method: str, request: bytes, headers: list[tuple[bytes, bytes]]
) -> RawResponse:
    """One unary call to 127.0.0.1:`port` with extra `headers` sent exactly as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = b"".join(
        _literal(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    body = b"\x00" + struct.pack(">I", len(request)) + request
    writer.write(
        _PREFACE
        + _frame(_SETTINGS, 0, 0, b"")
        + _frame(_HEADERS, _END_HEADERS, 1, block)
        + _frame(_DATA, _END_STREAM, 1, body)
    )
    await writer.drain()
    data = b""
    status = None
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), 10)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(length)
            if kind == _SETTINGS and not flags & _ACK:
                writer.write(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _GOAWAY:
                break
            elif stream == 1 and kind == _DATA:
                data += payload
            elif stream == 1 and kind == _HEADERS and flags & _END_STREAM:
                status = _grpc_status(payload)
                break
    finally:
        writer.close()
    message = data[5:] if status == 0 and len(data) >= 5 else None
    return RawResponse(grpc_status=status, message=message)
