"""An in-process stand-in for authsvc's side of LocalValidator: WatchRevocations (driven by
the test: revocations, key changes, heartbeats, dropped streams, compaction), GetJwks, and a
Validate that counts its calls. Tokens are signed as authsvc signs them (its
service/domain/access_tokens.py): RFC 9068 claims, `typ: at+jwt`, `kid`, `ugen`, low-s ES256.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.local_validator import LocalValidator
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf.timestamp_pb2 import Timestamp
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
Context = grpc.aio.ServicerContext[Any, Any]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1_000_000_000))
    return ts


@dataclass
class Signer:
    kid: str
    alg: str
    private_key: Any

    @classmethod
    def generate(cls, alg: str = "ES256") -> Signer:
        private: Any
        if alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        elif alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(alg)
        return cls(kid=secrets.token_urlsafe(12), alg=alg, private_key=private)

    def jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        converter: Any = {"ES256": ECAlgorithm, "EdDSA": OKPAlgorithm, "RS256": RSAAlgorithm}[
            self.alg
        ]
        jwk: dict[str, Any] = converter.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(
        self,
        claims: dict[str, Any],
        *,
        headers: dict[str, Any] | None = None,
        high_s: bool = False,
    ) -> str:
        token = jwt.encode(
            claims,
            self.private_key,
            algorithm=self.alg,
            headers={"kid": self.kid, "typ": "at+jwt", **(headers or {})},
        )
        if self.alg != "ES256":
            return token
        signing_input, _, signature_b64 = token.rpartition(".")
        signature = unb64(signature_b64)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        low = s if s <= P256_ORDER // 2 else P256_ORDER - s
        s = P256_ORDER - low if high_s else low
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class LogEntry:
    sequence: int
    sessions: list[tuple[str, float]] = field(default_factory=list)
    users: list[tuple[str, int, float]] = field(default_factory=list)
    jwks_json: str = ""


# What a test pushes onto the open streams: an update, None (end the stream), or a status.
StreamItem = auth_pb2.RevocationUpdate | grpc.StatusCode | None


ValidatorFactory = Callable[..., Coroutine[Any, Any, LocalValidator]]


class ManualClock:
    """Seconds, moved only by the test."""

    def __init__(self, start: float) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (a liveness bound, not a speed claim) until `condition()` holds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (the conditions are plain attributes)
            await asyncio.sleep(0.005)


class FakeAuthsvc(auth_pb2_grpc.AuthServiceServicer):
    """The test drives it; `clock` is the wall clock its tokens are stamped with."""

    issuer = "authsvc"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.address = ""  # set once served
        self.keys = [Signer.generate("ES256")]
        self.log: list[LogEntry] = []
        self.head = 0
        self.compacted_through = 0  # sequences at or below this cannot be resumed from
        self.sessions: dict[str, float] = {}
        self.users: dict[str, tuple[int, float]] = {}
        self.streams: list[asyncio.Queue[StreamItem]] = []
        self.watch_requests: list[int] = []
        self.watch_mode = "serve"  # or "unimplemented", "hold" (never answers)
        # A snapshot of more entries than this goes out in parts, as authsvc splits one
        # (its 10,000): the first with `snapshot`, all but the last with sequence 0.
        self.snapshot_part_entries = 10_000
        # End the next stream with UNAVAILABLE after this many snapshot parts (then None).
        self.cut_snapshot_after_parts: int | None = None
        # Wait for this event between snapshot parts (the test looks at the validator),
        # except on a stream to be cut (`cut_snapshot_after_parts`).
        self.between_snapshot_parts: asyncio.Event | None = None
        self.snapshot_parts_sent = 0
        # Send a heartbeat before every snapshot part but the first.
        self.heartbeat_between_snapshot_parts = False
        self.validate_calls: list[auth_pb2.ValidateRequest] = []
        self.validate_answer = auth_pb2.ValidateResponse(
            valid=True,
            subject="from-remote",
            session_id="remote-sid",
            token_id="remote-jti",
            scopes=["read"],
            expires_at=timestamp(clock() + 60),
        )

    # --- what the test does ------------------------------------------------------------

    @property
    def jwks_json(self) -> str:
        return json.dumps({"keys": [k.jwk() for k in self.keys]}, separators=(",", ":"))

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "user-1",
            "aud": "authsvc",
            "exp": now + 900,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "sid": "session-1",
            "scope": "read write",
            "ugen": 0,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, key: Signer | None = None, **overrides: Any) -> str:
        return (key or self.keys[-1]).sign(self.claims(**overrides))

    def _append(self, entry_of: Callable[[int], LogEntry]) -> auth_pb2.RevocationUpdate:
        self.head += 1
        entry = entry_of(self.head)
        self.log.append(entry)
        update = self._delta([entry])
        self.push(update)
        return update

    def revoke_session(self, session_id: str, keep_until: float | None = None) -> int:
        until = self.clock() + 3600 if keep_until is None else keep_until
        self.sessions[session_id] = until
        self._append(lambda seq: LogEntry(seq, sessions=[(session_id, until)]))
        return self.head

    def revoke_user(self, subject: str, generation: int, keep_until: float | None = None) -> int:
        until = self.clock() + 3600 if keep_until is None else keep_until
        self.users[subject] = (generation, until)
        self._append(lambda seq: LogEntry(seq, users=[(subject, generation, until)]))
        return self.head

    def set_keys(self, keys: list[Signer]) -> int:
        self.keys = keys
        jwks = self.jwks_json
        self._append(lambda seq: LogEntry(seq, jwks_json=jwks))
        return self.head

    def heartbeat(self) -> None:
        self.push(auth_pb2.RevocationUpdate(sent_at=timestamp(self.clock())))

    def push(self, item: StreamItem) -> None:
        for queue in self.streams:
            queue.put_nowait(item)

    def drop_streams(self, status: grpc.StatusCode | None = None) -> None:
        """End every open stream (cleanly, or with `status`)."""
        self.push(status)

    def compact(self) -> None:
        """Forget the log so far: a resume from anything before now gets a snapshot."""
        self.compacted_through = self.head
        self.log.clear()

    # --- what the client calls ---------------------------------------------------------

    def _delta(self, entries: list[LogEntry]) -> auth_pb2.RevocationUpdate:
        update = auth_pb2.RevocationUpdate(
            sequence=entries[-1].sequence if entries else self.head,
            sent_at=timestamp(self.clock()),
        )
        for entry in entries:
            for sid, until in entry.sessions:
                update.revoked.add(session_id=sid, keep_until=timestamp(until))
            for sub, gen, until in entry.users:
                update.revoked_users.add(subject=sub, generation=gen, keep_until=timestamp(until))
            if entry.jwks_json:
                update.jwks_json = entry.jwks_json
        return update

    def _snapshot(self) -> auth_pb2.RevocationUpdate:
        update = auth_pb2.RevocationUpdate(
            sequence=self.head,
            snapshot=True,
            jwks_json=self.jwks_json,
            sent_at=timestamp(self.clock()),
        )
        for sid, until in self.sessions.items():
            update.revoked.add(session_id=sid, keep_until=timestamp(until))
        for sub, (gen, until) in self.users.items():
            update.revoked_users.add(subject=sub, generation=gen, keep_until=timestamp(until))
        return update

    def _snapshot_parts(self) -> list[auth_pb2.RevocationUpdate]:
        """The snapshot as authsvc sends it (service/api/revocation_watch.py): chunks of at
        most `snapshot_part_entries` entries, sessions first; the first part has
        `snapshot` and the JWK Set, every part but the last has sequence 0."""
        whole = self._snapshot()
        entries: list[auth_pb2.RevokedSession | auth_pb2.RevokedUser] = [
            *whole.revoked,
            *whole.revoked_users,
        ]
        size = self.snapshot_part_entries
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)] or [[]]
        parts = []
        for i, chunk in enumerate(chunks):
            part = auth_pb2.RevocationUpdate(
                sequence=whole.sequence if i == len(chunks) - 1 else 0,
                snapshot=whole.snapshot and i == 0,
                jwks_json=whole.jwks_json if i == 0 else "",
                sent_at=whole.sent_at,
            )
            for entry in chunk:
                if isinstance(entry, auth_pb2.RevokedSession):
                    part.revoked.append(entry)
                else:
                    part.revoked_users.append(entry)
            parts.append(part)
        return parts

    async def WatchRevocations(
        self, request: auth_pb2.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.RevocationUpdate]:
        self.watch_requests.append(request.after_sequence)
        if self.watch_mode == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchRevocations is not served")
        if self.watch_mode == "hold":
            await asyncio.Event().wait()
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.streams.append(queue)
        try:
            after = request.after_sequence
            if after == 0 or after <= self.compacted_through or after > self.head:
                for sent, part in enumerate(self._snapshot_parts()):
                    if sent and self.heartbeat_between_snapshot_parts:
                        yield auth_pb2.RevocationUpdate(sent_at=timestamp(self.clock()))
                    if sent == self.cut_snapshot_after_parts:
                        self.cut_snapshot_after_parts = None
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "cut mid-snapshot")
                    if (
                        sent
                        and self.between_snapshot_parts is not None
                        and self.cut_snapshot_after_parts is None  # the cut stream goes on
                    ):
                        await self.between_snapshot_parts.wait()
                    yield part
                    self.snapshot_parts_sent += 1
            else:
                missed = [e for e in self.log if e.sequence > after]
                first = self._delta(missed)
                first.jwks_json = self.jwks_json
                yield first
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "cut off by the test")
                yield item
        finally:
            self.streams.remove(queue)

    async def Validate(
        self, request: auth_pb2.ValidateRequest, context: Context
    ) -> auth_pb2.ValidateResponse:
        self.validate_calls.append(request)
        return self.validate_answer

    async def Issue(self, request: auth_pb2.IssueRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

    async def Refresh(self, request: auth_pb2.RefreshRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

    async def Revoke(self, request: auth_pb2.RevokeRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Context
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(jwks_json=self.jwks_json)
