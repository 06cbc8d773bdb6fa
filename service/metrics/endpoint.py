"""`MetricsEndpoint`: HTTP GET /metrics for a registry, on a thread and event loop of its
own, holding every client to `EndpointLimits` (a flood of scrapers or slow connections
costs a bounded number of sockets, no threads, and at most a quarter of the time spent
rendering)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Final

from authsvc_client.addresses import HostPort
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """What one `/metrics` client may hold of the endpoint. Scrapers send a short head
    and read a short answer; anything slower or larger is cut off, so a flood of
    connections costs the server a bounded number of sockets and no threads."""

    max_connections: int = 32
    """Connections open at once. One more takes the place of the oldest that has not sent
    its whole head yet (a scraper sends its head at once: only a client holding connections
    idle loses one); if every open one has, it is closed as soon as it is accepted."""
    head_timeout: float = 5.0
    """Seconds to send the whole request head (not per read: trickling does not help)."""
    max_head_bytes: int = 8192
    """Request line and headers; a longer head is answered 431."""
    answer_timeout: float = 10.0
    """Seconds to render and take the answer once the head is in."""


DEFAULT_ENDPOINT_LIMITS: Final = EndpointLimits()

# After a rendering that took d seconds, the next waits until 3d have passed: a flood of
# scrapes gets the rendering at most a quarter of the time, and every scrape still gets
# values read after it arrived.
_RENDER_PAUSE_FACTOR: Final = 3.0
_HEAD_END: Final = b"\r\n\r\n"


def _response(
    status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", *extra: str
) -> bytes:
    head = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _MetricsHttp:
    """The HTTP/1.1 side of `MetricsEndpoint`, run on the endpoint's own event loop: one
    request per connection, answered and closed."""

    def __init__(self, registry: CollectorRegistry, limits: EndpointLimits) -> None:
        self._registry = registry
        self._limits = limits
        self._open: dict[asyncio.StreamWriter, bool] = {}
        """The open connections, oldest first, and whether each has sent its whole head."""
        self._handlers: set[asyncio.Task[None]] = set()
        self._render_lock = asyncio.Lock()
        self._latest: tuple[str, float, bytes] | None = None
        """(content type, when its rendering started, the text) of the latest rendering."""
        self._next_render_at = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._limits.max_connections and not self._make_room():
            writer.transport.abort()
            return
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        self._open[writer] = False
        try:
            head = await self._read_head(reader)
            if head is None or writer not in self._open:  # too slow, or closed for another
                return
            self._open[writer] = True
            answer = await self._answer(head)
            async with asyncio.timeout(self._limits.answer_timeout):
                writer.write(answer)
                await writer.drain()
            writer.close()
        except (OSError, TimeoutError):
            pass  # the client went away or was too slow: nothing to tell it
        finally:
            self._open.pop(writer, None)
            if not writer.is_closing():
                writer.transport.abort()

    def _make_room(self) -> bool:
        """Close the oldest connection still without its whole head, if there is one: its
        handler sees the end and lets go of its slot."""
        for writer, has_head in self._open.items():
            if not has_head:
                del self._open[writer]
                writer.transport.abort()
                return True
        return False

    async def abort_all(self, *, wait: float = 1.0) -> None:
        """Drop every open connection, and let their handlers see it and end: a handler
        still waiting when the loop closes is cancelled, which Python 3.11's streams report
        as an "Exception in callback" traceback, one per connection (a flood of them on a
        SIGTERM during a flood of connections)."""
        for writer in list(self._open):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=wait)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request head, b"" when it is over the limit, or None to just close (no
        complete head in time)."""
        try:
            async with asyncio.timeout(self._limits.head_timeout):
                return await reader.readuntil(_HEAD_END)
        except asyncio.LimitOverrunError:
            return b""
        except (TimeoutError, asyncio.IncompleteReadError):
            return None

    async def _answer(self, head: bytes) -> bytes:
        """The response to send for `head` (b"": a head over the limit)."""
        if not head:
            return _response("431 Request Header Fields Too Large", b"request head too large\n")
        lines = head[: -len(_HEAD_END)].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"not an HTTP/1.x request\n")
        method, target, _ = parts
        if method != "GET":
            return _response(
                "405 Method Not Allowed", b"only GET\n", "text/plain; charset=utf-8", "Allow: GET"
            )
        if target.partition("?")[0] not in ("/metrics", "/metrics/"):
            return _response("404 Not Found", b"not found; metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            async with asyncio.timeout(self._limits.answer_timeout):
                body, content_type = await self._render(accept)
        except TimeoutError:
            raise
        except Exception:
            log.exception("rendering the metrics failed")
            return _response("500 Internal Server Error", b"rendering the metrics failed\n")
        return _response("200 OK", body, content_type)

    async def _render(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (Prometheus text by default). One
        rendering at a time: scrapes that arrived before one started share it."""
        encoder, content_type = choose_encoder(accept)
        asked_at = time.monotonic()
        async with self._render_lock:
            latest = self._latest
            if latest is not None and latest[0] == content_type and latest[1] >= asked_at:
                return latest[2], content_type
            pause = self._next_render_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            started = time.monotonic()
            body = encoder(self._registry)
            finished = time.monotonic()
            self._latest = (content_type, started, body)
            self._next_render_at = finished + _RENDER_PAUSE_FACTOR * (finished - started)
            return body, content_type


def _dual_stack_socket(port: int) -> socket.socket:
    """`[::]:port` taking IPv4 too, as gRPC's listener on `[::]` does (asyncio's own
    bind sets IPV6_V6ONLY, so AUTH_METRICS_LISTEN=[::]:9464 missed IPv4 scrapers)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class MetricsEndpoint:
    """HTTP GET /metrics for a registry, served by an asyncio loop in one thread of its own
    (so neither the gRPC loop nor the supervisor's watch loop serves it), within `limits`."""

    def __init__(self, registry: CollectorRegistry, limits: EndpointLimits) -> None:
        self._registry = registry
        self._limits = limits
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.host: str = ""
        self.port: int = 0
        """The bound port (the real one when asked for port 0)."""

    @property
    def address(self) -> HostPort:
        """HOST:PORT as bound."""
        return HostPort(self.host, self.port)

    @classmethod
    def start(
        cls,
        listen: str,
        registry: CollectorRegistry,
        *,
        limits: EndpointLimits = DEFAULT_ENDPOINT_LIMITS,
    ) -> MetricsEndpoint:
        """Bind `listen` ("HOST:PORT", IPv6 host in brackets, port 0 for any) and serve.

        Raises ValueError if `listen` is not HOST:PORT, OSError if it cannot be bound.
        """
        address = HostPort.parse(listen)
        endpoint = cls(registry, limits)
        thread = threading.Thread(
            target=asyncio.run,
            args=(endpoint._serve(address.host, address.port),),
            name="metrics-http",
            daemon=True,
        )
        endpoint._thread = thread
        thread.start()
        endpoint._started.wait()
        if endpoint._failure is not None:
            thread.join()
            raise endpoint._failure
        return endpoint

    async def _serve(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        http = _MetricsHttp(self._registry, self._limits)
        try:
            ip = HostPort(host, port).ip
            if ip is not None and ip.version == 6 and ip.is_unspecified:
                server = await asyncio.start_server(
                    http.handle, sock=_dual_stack_socket(port), limit=self._limits.max_head_bytes
                )
            else:
                family = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )[0][0]
                server = await asyncio.start_server(
                    http.handle, host, port, family=family, limit=self._limits.max_head_bytes
                )
        except Exception as exc:  # handed to start()'s caller
            self._failure = exc
            self._started.set()
            return
        bound = server.sockets[0].getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        self._started.set()
        async with server:
            await self._stop.wait()
            server.close()
            await http.abort_all()

    def close(self) -> None:
        """Stop serving, drop open connections and release the port."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has finished already
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
