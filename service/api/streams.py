"""Call budgets: unary calls and long-lived streams are limited separately, so that idle
streams (health Watch, reflection) cannot starve Issue, Validate and GetJwks. grpc's own
`maximum_concurrent_rpcs` counts every call alike, so it is set to the two budgets
together (`calls_limit`: a bound on calls the budgets cannot see) and
`CallBudgetInterceptor` keeps the two budgets (`UnaryBudget`, `StreamBudget`);
`transport_options` caps HTTP/2 streams per connection and pings idle ones. The limits and
their statuses: docs/api.md, "Limits" and "Streams".

The budget is picked by the handler's kind, never by method name, so a streaming RPC added
later is held to the stream budget without a change here. Handlers must be async; a plain
function would run in a thread outside this accounting, so it is refused (UNIMPLEMENTED,
logged) rather than served unbudgeted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from service.api.status import to_status
from service.api.wire import Context
from service.api.wrapped_handlers import WrappedHandlers
from service.domain.events import peer_address
from service.errors import (
    AuthError,
    ShuttingDown,
    StreamMaxAgeReached,
    TooManyCalls,
    TooManyStreams,
    TooManyStreamsFromPeer,
)
from service.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "CallBudgetInterceptor",
    "StreamBudget",
    "UnaryBudget",
    "calls_limit",
    "transport_options",
]

# gRPC channel arguments are C ints.
_MAX_CHANNEL_ARG = 2**31 - 1
# A connection with calls open is pinged this often, and dropped when a ping goes this
# long unanswered: the streams of a client that vanished without closing end.
KEEPALIVE_SECONDS = 60
KEEPALIVE_TIMEOUT_SECONDS = 20
# At most one log line per this many seconds about refused calls, however many there are.
_REFUSAL_LOG_INTERVAL = 10.0
# Seconds without a new unary call after which a closed UnaryBudget lets gRPC stop.
QUIET_BEFORE_STOP = 0.05


def transport_options(settings: Settings) -> list[tuple[str, int]]:
    """HTTP/2 options of the server for the budgets.

    `grpc.max_concurrent_streams` caps the calls of one connection (unary calls are HTTP/2
    streams too, and a client queues its calls beyond the cap). It is the whole unary budget
    plus one peer's share of streams: a client holding all the streams it may hold can still
    make as many unary calls on the same connection as the server would serve at all.

    A connection is told to go (GOAWAY; its client opens another) after AUTH_STREAM_MAX_AGE
    (gRPC moves that by up to 10 % either way), and closed twice that later with whatever
    it still holds. The budgets only see a unary call once its request is whole: a call
    whose request never comes (headers sent, then nothing) would otherwise hold its memory
    for as long as its client keeps the connection up. A stream opened just before the
    GOAWAY ends by itself (STREAM_MAX_AGE) well before the close.
    """
    max_age_ms = min(round(settings.stream_max_age * 1000), _MAX_CHANNEL_ARG)
    grace_ms = min(2 * max_age_ms, _MAX_CHANNEL_ARG)
    return [
        (
            "grpc.max_concurrent_streams",
            min(settings.max_concurrent_rpcs + settings.max_streams_per_peer, _MAX_CHANNEL_ARG),
        ),
        ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        # Keep pinging a connection whose only call is an idle stream (no data frames).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", max_age_ms),
        ("grpc.max_connection_age_grace_ms", grace_ms),
    ]


def calls_limit(settings: Settings) -> int:
    """gRPC's own limit on the calls of one process (`maximum_concurrent_rpcs`): it counts a
    call from its headers, so it also holds the calls the budgets never see (a unary call
    whose request has not arrived). Both budgets fit under it: legitimate calls are refused
    by the budgets first, with their own reasons."""
    return settings.max_concurrent_rpcs + settings.max_streams


class UnaryBudget:
    """Unary calls in progress in this process, at most `limit`; none once `close`d."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0
        self.closed = False
        self.refused_while_closed = 0
        """Calls refused once closed (told in one line at the stop's end)."""
        self.last_arrival = 0.0
        """time.monotonic() of the last unary call that reached us, taken or refused."""

    def enter(self) -> None:
        """Count a call in, or raise TooManyCalls (or ShuttingDown once closed)."""
        self.last_arrival = time.monotonic()
        if self.closed:
            self.refused_while_closed += 1
            raise ShuttingDown()
        if self.in_progress >= self.limit:
            raise TooManyCalls()
        self.in_progress += 1

    async def close(self, *, within: float, quiet: float = QUIET_BEFORE_STOP) -> None:
        """Refuse new calls (UNAVAILABLE), then wait, at most `within` seconds, until no
        call is in progress and none came for `quiet` seconds: gRPC's stop then finds no
        call it received but had not handed to us yet (those it ends with CANCELLED)."""
        self.closed = True
        give_up = time.monotonic() + within
        while (now := time.monotonic()) < give_up:
            if self.in_progress == 0 and now - self.last_arrival >= quiet:
                return
            await asyncio.sleep(quiet / 5)

    def leave(self) -> None:
        self.in_progress -= 1


@dataclass(frozen=True, slots=True)
class StreamSlot:
    """One open stream: whose it is and when it must end (event-loop time)."""

    peer: str
    deadline: float


class StreamBudget:
    """Open streams in this process: at most `limit` in all and `per_peer` for one address
    (`peer_address`), each for at most `max_age` seconds.

    Memory follows the open streams only: an address without streams is forgotten.
    """

    def __init__(self, *, limit: int, per_peer: int, max_age: float) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.max_age = max_age
        self.open_streams = 0
        self._by_peer: dict[str, int] = {}

    @property
    def peers_holding_streams(self) -> int:
        return len(self._by_peer)

    def open(self, peer: str, *, now: float = 0.0) -> StreamSlot:
        """A slot for a new stream from gRPC peer `peer`, or TooManyStreams /
        TooManyStreamsFromPeer. `now` is event-loop time (for the deadline)."""
        if self.open_streams >= self.limit:
            raise TooManyStreams()
        address = peer_address(peer)
        held = self._by_peer.get(address, 0)
        if held >= self.per_peer:
            raise TooManyStreamsFromPeer()
        self._by_peer[address] = held + 1
        self.open_streams += 1
        return StreamSlot(peer=address, deadline=now + self.max_age)

    def close(self, slot: StreamSlot) -> None:
        self.open_streams -= 1
        held = self._by_peer[slot.peer] - 1
        if held:
            self._by_peer[slot.peer] = held
        else:
            del self._by_peer[slot.peer]


class _RefusalLog:
    """Refusals are logged as a count at most once per interval: a flood of refused calls
    must not become as many log lines."""

    def __init__(self, interval: float = _REFUSAL_LOG_INTERVAL) -> None:
        self._interval = interval
        self._counts: dict[str, int] = {}
        self._last = -interval

    def refused(self, reason: str, peer: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        counts = ", ".join(f"{n} {r}" for r, n in sorted(self._counts.items()))
        self._counts.clear()
        log.warning(
            "security: calls refused over budget in the last %.0fs: %s (latest from %s)",
            self._interval,
            counts,
            peer,
        )


Behavior = Callable[[Any, Context], Any]


class CallBudgetInterceptor(grpc.aio.ServerInterceptor):
    """Holds unary calls to the unary budget and streaming calls to the stream budget
    (chosen by the handler's kind: every streaming RPC, present or future, is covered)."""

    def __init__(self, unary: UnaryBudget, streams: StreamBudget) -> None:
        self._unary = unary
        self._streams = streams
        self._refusals = _RefusalLog()
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        budgeted: grpc.RpcMethodHandler[Any, Any] | None = self._wrapped.get(
            method, handler, lambda: self.wrap(method, handler)
        )
        return budgeted

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """`handler` held to its budget, or None (not served: not async). The layer
        `service.server` applies once, when the method is registered."""
        streaming = handler.request_streaming or handler.response_streaming
        # Typed by the stubs for the sync server; grpc.aio passes its own context.
        behavior: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if behavior is None or not (
            inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        ):
            log.error("%s has no async handler; the call budget refuses to serve it", method)
            return None
        if not streaming:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_call(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        wrapped = (
            self._streamed_responses(behavior)
            if inspect.isasyncgenfunction(behavior)
            else self._stream_call(behavior)
        )
        make = {
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(self, error: AuthError, context: Context) -> NoReturn:
        self._refusals.refused(error.reason, context.peer())
        await context.abort_with_status(to_status(error))

    def _unary_call(self, behavior: Behavior) -> Behavior:
        budget = self._unary

        async def budgeted(request: Any, context: Context) -> Any:
            try:
                budget.enter()
            except ShuttingDown as error:
                # Part of a stop, not over budget: counted, and told once at its end.
                await context.abort_with_status(to_status(error))
            except TooManyCalls as error:
                await self._refuse(error, context)
            try:
                return await behavior(request, context)
            finally:
                budget.leave()

        return budgeted

    async def _open_stream(self, context: Context) -> StreamSlot:
        try:
            return self._streams.open(context.peer(), now=asyncio.get_running_loop().time())
        except (TooManyStreams, TooManyStreamsFromPeer) as error:
            await self._refuse(error, context)

    def _stream_call(self, behavior: Behavior) -> Behavior:
        """A coroutine handler (it reads and writes through the context, like health
        Watch, or returns one response to a request stream)."""

        async def budgeted(request_or_iterator: Any, context: Context) -> Any:
            slot = await self._open_stream(context)
            try:
                timeout = asyncio.timeout_at(slot.deadline)
                try:
                    async with timeout:
                        return await behavior(request_or_iterator, context)
                except TimeoutError:
                    if not timeout.expired():
                        raise
            finally:
                self._streams.close(slot)
            await context.abort_with_status(to_status(StreamMaxAgeReached()))

        return budgeted

    def _streamed_responses(self, behavior: Behavior) -> Callable[[Any, Context], Any]:
        """An async-generator handler (like reflection): the age limit applies to each
        wait for the next response, never across a `yield` (a timeout must not fire while
        gRPC, not this generator, runs)."""

        async def budgeted(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
            slot = await self._open_stream(context)
            try:
                responses: AsyncIterator[Any] = behavior(request_or_iterator, context)
                try:
                    while True:
                        timeout = asyncio.timeout_at(slot.deadline)
                        try:
                            async with timeout:
                                response = await anext(responses)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            if not timeout.expired():
                                raise
                            break
                        yield response
                finally:
                    await responses.aclose()  # type: ignore[attr-defined]
            finally:
                self._streams.close(slot)
            await context.abort_with_status(to_status(StreamMaxAgeReached()))

        return budgeted
