"""What every servicer needs from the gRPC side: registration with a request parser that
never turns bad bytes into INTERNAL, the caller's address and agent, timestamps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from service.api.wrapped_handlers import HandlerRegistry
from service.domain.records import CallerInfo
from service.domain.usernames import escape_text

Context = grpc.aio.ServicerContext[Any, Any]


class UndecodableRequest:
    """Stands in for a request whose bytes did not parse (for example invalid UTF-8).

    gRPC answers INTERNAL when a deserializer raises; we answer INVALID_ARGUMENT
    (`service.api.status.maps_errors`).
    """


def timestamp_fields(seconds: float) -> dict[str, int]:
    """A Timestamp's fields, to initialise a message's Timestamp field with: protobuf
    builds it in place from these, where a Timestamp message would be built and then
    copied in (about a microsecond each, on every Refresh, Issue and Validate). From the
    two fields in one step: FromNanoseconds is Python code."""
    whole, nanos = divmod(int(seconds * 1_000_000_000), 1_000_000_000)
    return {"seconds": whole, "nanos": nanos}


def timestamp(seconds: float) -> Timestamp:
    return Timestamp(**timestamp_fields(seconds))


def set_timestamp(field: Timestamp, seconds: float) -> None:
    """Write `seconds` into a message's Timestamp field, in place (the field is set even
    at the epoch, as when initialised with `timestamp_fields`)."""
    field.seconds, field.nanos = divmod(int(seconds * 1_000_000_000), 1_000_000_000)


MAX_USER_AGENT_CHARS = 256
MAX_PEER_CHARS = 256


def caller_info(context: Context) -> CallerInfo:
    """The caller's address and user agent, as stored with sessions and events: escaped
    (a raw client can send NUL, which PostgreSQL text refuses, or newlines and terminal
    escapes, which would reach operators' screens) and capped."""
    user_agent = None
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            user_agent = escape_text(value, limit=MAX_USER_AGENT_CHARS)
    return CallerInfo(peer=_peer(context), user_agent=user_agent)


def caller_peer(context: Context) -> CallerInfo:
    """The caller's address alone (`caller_info` without the user agent, whose metadata
    is not even looked at), for a call that records no agent: Refresh stores the peer
    with a rotation and its events, never the agent."""
    return CallerInfo(peer=_peer(context))


def _peer(context: Context) -> str | None:
    peer = context.peer()
    return None if peer is None else escape_text(peer, limit=MAX_PEER_CHARS)


def bearer_credential(context: Context, *, max_length: int) -> str | None:
    """The credential of the "authorization: Bearer <credential>" metadata, if any (an end
    user's access token for Revoke, a service token for guarded calls)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, credential = value.partition(" ")
            if scheme.lower() == "bearer" and 0 < len(credential) <= max_length:
                return credential.strip()
    return None


def _tolerant_deserializer(cls: type[Message]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except DecodeError:
            return UndecodableRequest()

    return deserialize


def _serializer(cls: type[Message]) -> Callable[[object], bytes]:
    """The message's own serializer, except that bytes (a message serialized already, such
    as the revocation updates shared by every watcher) are sent as they are."""
    serialize = cls.SerializeToString

    def serializer(message: object) -> bytes:
        if isinstance(message, bytes):
            return message
        return serialize(message)  # type: ignore[arg-type]

    return serializer


def add_servicer(servicer: object, service: ServiceDescriptor, server: HandlerRegistry) -> None:
    """Register like the generated `add_*Servicer_to_server`, except that a request that
    does not parse reaches the servicer (and becomes INVALID_ARGUMENT)."""
    handlers = {}
    for method in service.methods:
        # Server-streaming methods (WatchRevocations) get a stream handler.
        make_handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=_tolerant_deserializer(
                message_factory.GetMessageClass(method.input_type)
            ),
            response_serializer=_serializer(message_factory.GetMessageClass(method.output_type)),
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)
