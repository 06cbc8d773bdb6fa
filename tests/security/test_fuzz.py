"""Property-based fuzzing of every RPC's request fields against one live server.

The property, for every generated request: the answer is OK, or a failure whose status
code and `ErrorInfo` reason form one of the documented pairs (the error table in docs/api.md), with
domain "authsvc" and a `BadRequest` for INVALID_ARGUMENT. Never INTERNAL, UNKNOWN, a
deadline, or a non-OK status without a google.rpc.Status. Where the documented limits
decide the answer (empty or oversized fields, RFC 6749 scope characters, NUL characters,
the one known user and password), the test predicts the exact reason; Validate on
anything but the one real token answers `valid=false`.

One server (with its own database) serves the whole module. It runs in a private event
loop: the tests are plain sync functions, and each hypothesis example drives the loop
with `run_until_complete`, which avoids mixing hypothesis with function-scoped async
fixtures. Examples are derandomized, so CI sees the same inputs every run.

Login throttling stays on (its code path is fuzzed too) with allowances of 10**6, so
no example is refused for an earlier one's failures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.clock import ManualClock
from service.domain.usernames import username_key, username_key_too_long
from service.settings import Settings
from tests.live_server import (
    PASSWORD,
    TEST_KEK,
    LiveServer,
    database_uri,
    start_live_server,
    stop_live_server,
)

pytestmark = pytest.mark.system  # hypothesis fuzzing and a memory bound

T = TypeVar("T")
Code = grpc.StatusCode
RawCall = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]

OK = "OK"
CALL_TIMEOUT = 20.0
KNOWN_USER = "fuzz-known-user"
USER_SCOPES = frozenset({"read", "write"})
DEFAULT_AUDIENCE = "authsvc"  # Settings.audience

# The documented limits (docs/api.md, "Limits"), kept here independently of service code.
MAX_TOKEN_BYTES = 8 * 1024
MAX_USERNAME_BYTES = 256
MAX_PASSWORD_BYTES = 1024
MAX_SCOPES = 32
MAX_SCOPE_BYTES = 128
MAX_AUDIENCE_BYTES = 256
MAX_ID_BYTES = 256
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token

# The documented (status code, reason) pairs that fuzzed requests may meet.
REASON_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": Code.INVALID_ARGUMENT,
    "INVALID_CREDENTIALS": Code.UNAUTHENTICATED,
    "REFRESH_TOKEN_INVALID": Code.UNAUTHENTICATED,
    "CALLER_UNAUTHENTICATED": Code.UNAUTHENTICATED,
    "SCOPE_NOT_ALLOWED": Code.PERMISSION_DENIED,
    "LOGIN_THROTTLED": Code.RESOURCE_EXHAUSTED,
}

# Which reasons each RPC may answer with to arbitrary bytes.
RAW_REASONS: dict[str, frozenset[str]] = {
    "Issue": frozenset({OK, "INVALID_ARGUMENT", "INVALID_CREDENTIALS", "SCOPE_NOT_ALLOWED"}),
    "Refresh": frozenset({"INVALID_ARGUMENT", "REFRESH_TOKEN_INVALID"}),
    "Validate": frozenset({OK, "INVALID_ARGUMENT"}),
    "Revoke": frozenset({OK, "INVALID_ARGUMENT", "CALLER_UNAUTHENTICATED"}),
    "GetJwks": frozenset({OK, "INVALID_ARGUMENT"}),
}
RESPONSES: dict[str, Callable[[bytes], Any]] = {
    "Issue": auth_pb2.IssueResponse.FromString,
    "Refresh": auth_pb2.RefreshResponse.FromString,
    "Validate": auth_pb2.ValidateResponse.FromString,
    "Revoke": auth_pb2.RevokeResponse.FromString,
    "GetJwks": auth_pb2.GetJwksResponse.FromString,
}


def fuzz_settings(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Deterministic hypothesis settings: fixed inputs, no example database, no deadline."""
    return hypothesis_settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# Strategies

# Unicode edge cases (no surrogates: they cannot travel in a protobuf string).
EDGE_PIECES = (
    "\x00",
    "\x01",
    "\x7f",
    "\t",
    "\n",
    "\r\n",
    " ",
    '"',
    "\\",
    "'",
    "%00",
    "%s",
    "\u00e9",
    "e\u0301",  # e + combining acute
    "\u0301",  # a lone combining mark
    "\u0300\u0316\u0358",  # stacked combining marks
    "\u200b",  # zero-width space
    "\u200d",  # zero-width joiner
    "\u200f",  # right-to-left mark
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u05d0\u05d1",  # Hebrew
    "\u0627\u0644",  # Arabic
    "\ufeff",  # byte order mark
    "\ufffd",
    "\uffff",  # noncharacter
    "\u2028",  # line separator
    "\u0130",  # dotted capital I (case-mapping edge)
    "\u00df",
    "\ufb03",
    "\U0001f600",  # astral: emoji
    "\U0001f1fa\U0001f1f8",  # flag (two regional indicators)
    "\U0001d518",  # astral: mathematical fraktur
    "\U0010ffff",  # the last code point
)
BOUNDARY_PIECES = ("a", "\u00e9", "\u20ac", "\U0001f600", "\u0301", "\x00", "\u202e")


def sized_text(piece: str, target: int, delta: int) -> str:
    """Exactly `target + delta` UTF-8 bytes, mostly made of `piece`."""
    total = max(1, target + delta)
    unit = len(piece.encode())
    count = total // unit
    return piece * count + "a" * (total - count * unit)


def byte_len(text: str) -> int:
    return len(text.encode())


edge_texts = st.lists(st.sampled_from(EDGE_PIECES), max_size=24).map("".join)
boundary_texts = st.builds(
    sized_text,
    st.sampled_from(BOUNDARY_PIECES),
    st.sampled_from([128, 256, 1024, 8192]),
    st.integers(-2, 2),
)
refresh_shaped = st.from_regex(r"[A-Za-z0-9_-]{42,44}", fullmatch=True)
jwt_shaped = st.from_regex(
    r"eyJ[A-Za-z0-9_-]{4,60}\.eyJ[A-Za-z0-9_-]{4,120}\.[A-Za-z0-9_-]{0,90}", fullmatch=True
)
# Within every limit and without NUL: requests that get past the field checks.
plain_texts: st.SearchStrategy[str] = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1),
    st.lists(st.sampled_from([p for p in EDGE_PIECES if "\x00" not in p]), min_size=1).map("".join),
).filter(lambda t: byte_len(t) <= 256)
texts: st.SearchStrategy[str] = st.one_of(
    st.just(""),
    st.text(max_size=64),
    edge_texts,
    boundary_texts,
    refresh_shaped,
    jwt_shaped,
)
scope_texts: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(["read", "write", "admin", "read write", 'a"b', "a\\b", "", "r\u00e9ad"]),
    st.from_regex(r"[\x21\x23-\x5b\x5d-\x7e]{1,12}", fullmatch=True),
    st.text(max_size=16),
    st.builds(sized_text, st.sampled_from(["s", "\u00e9"]), st.just(128), st.integers(-1, 1)),
)
scope_lists: st.SearchStrategy[list[str]] = st.one_of(
    st.just([]),
    st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3),
    st.lists(scope_texts, max_size=4),
    st.lists(st.sampled_from(["read", "write"]), min_size=MAX_SCOPES - 1, max_size=MAX_SCOPES + 2),
)
# Legal gRPC metadata values are printable ASCII; anything else fails in the client.
header_texts = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


def too_long(value: str, limit: int) -> bool:
    return byte_len(value) > limit


def bad_text(value: str, limit: int) -> bool:
    """A required text field the service must refuse: empty, over its limit, or holding
    NUL (valid UTF-8, but PostgreSQL text cannot store it: INVALID_ARGUMENT by policy)."""
    return not value or too_long(value, limit) or "\x00" in value


def bad_optional_text(value: str, limit: int) -> bool:
    return bool(value) and bad_text(value, limit)


def scopes_invalid(scopes: list[str]) -> bool:
    return len(scopes) > MAX_SCOPES or any(
        too_long(s, MAX_SCOPE_BYTES) or SCOPE_TOKEN.fullmatch(s) is None for s in scopes
    )


@st.composite
def mutations(draw: st.DrawFn, original: str, end: int) -> str:
    """`original` changed somewhere in [0, end): never equal to it."""
    kind = draw(st.sampled_from(["replace", "insert", "delete", "prefix", "swapcase"]))
    position = draw(st.integers(0, end - 1))
    if kind == "replace":
        old = original[position]
        new = draw(st.one_of(st.sampled_from("Aa0_-.=+/ "), st.sampled_from(EDGE_PIECES)))
        if new == old:
            new = "B" if old != "B" else "C"
        return original[:position] + new + original[position + 1 :]
    if kind == "insert":
        inserted: str = draw(st.sampled_from((*EDGE_PIECES, "A", ".")))
        return original[:position] + inserted + original[position:]
    if kind == "delete":
        return original[:position] + original[position + 1 :]
    if kind == "prefix":
        return draw(st.sampled_from(["A", " ", "Bearer ", "\x00"])) + original
    changed = original[:end].swapcase() + original[end:]
    return changed if changed != original else original + "x"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def raw_field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field. Wire types 0, 1, 2 and 5 are well framed (a varint, 8 bytes,
    length-prefixed bytes, 4 bytes); 3, 4, 6 and 7 (groups, invalid) take `payload` raw."""
    tag = varint((number << 3) | wire_type)
    if wire_type == 0:
        return tag + varint(int.from_bytes(payload[:9], "little"))
    if wire_type == 1:
        return tag + payload[:8].ljust(8, b"\0")
    if wire_type == 5:
        return tag + payload[:4].ljust(4, b"\0")
    if wire_type == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


BAD_UTF8 = (b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"a\xf4\x90\x80\x80")
payloads = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(str.encode),
    st.sampled_from(BAD_UTF8),
)
# Strings in fields 1-4 (every request's string fields, and PasswordCredentials').
string_fields = st.lists(
    st.builds(raw_field, st.integers(1, 4), st.just(2), payloads), min_size=1, max_size=4
).map(b"".join)
fields = st.one_of(
    st.builds(raw_field, st.integers(1, 4), st.just(2), payloads),
    st.builds(raw_field, st.integers(1, 4), st.just(2), string_fields),  # a nested message
    st.builds(raw_field, st.integers(1, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), payloads),
    st.builds(raw_field, st.integers(1, 20), st.sampled_from([3, 4, 6, 7]), payloads),
)
protobuf_ish = st.lists(fields, max_size=6).map(b"".join)
# Well-formed: UTF-8 strings in fields 1-4 (maybe nested), plus unknown fields.
clean_strings = st.text(min_size=1, max_size=40).map(str.encode)
first_fields = st.sampled_from([1, 1, 1, 2, 3, 4])  # field 1 is every request's main one
clean_fields = st.one_of(
    st.builds(raw_field, first_fields, st.just(2), clean_strings),
    st.builds(
        raw_field,
        first_fields,
        st.just(2),
        st.lists(
            st.builds(raw_field, st.integers(1, 2), st.just(2), clean_strings), max_size=2
        ).map(b"".join),
    ),
    st.builds(raw_field, st.integers(5, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), payloads),
)
raw_bodies: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=2048),
    protobuf_ish,
    st.builds(
        bytes.__add__,
        st.builds(raw_field, st.just(1), st.just(2), clean_strings),
        st.lists(clean_fields, max_size=3).map(b"".join),
    ),
    st.builds(bytes.__add__, protobuf_ish, st.binary(min_size=1, max_size=8)),
)


# The answer check


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call, after checking the error is well formed:
    a documented (code, reason) pair with a matching google.rpc.Status."""
    code = error.code()
    assert code not in (Code.INTERNAL, Code.UNKNOWN), f"{code}: {error.details()!r}"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{code} ({error.details()!r}) carried no google.rpc.Status"
    infos: list[error_details_pb2.ErrorInfo] = []
    violations = 0
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += len(bad.field_violations)
    assert len(infos) == 1, f"{code} carried {len(infos)} ErrorInfo details"
    info = infos[0]
    assert info.domain == "authsvc"
    assert REASON_CODES.get(info.reason) == code, f"undocumented pair {code} / {info.reason}"
    if code == Code.INVALID_ARGUMENT:
        assert violations > 0, "INVALID_ARGUMENT without a BadRequest field violation"
    return info.reason


async def attempt(make: Callable[[], Awaitable[T]]) -> tuple[T | None, str]:
    """The response and OK, or None and the (checked) reason of the failure.

    `make` starts the call: gRPC calls must be created inside the running loop."""
    try:
        return await make(), OK
    except grpc.aio.AioRpcError as error:
        return None, reason_of(error)


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


# The server


@dataclass
class Harness:
    """One live server in a private event loop, with a known user and a real session."""

    loop: asyncio.AbstractEventLoop
    live: LiveServer
    subject: str
    pair: auth_pb2.TokenPair
    raw: dict[str, RawCall] = field(default_factory=dict)
    baseline_rss: int = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def attempt(self, make: Callable[[], Awaitable[T]]) -> tuple[T | None, str]:
        """`attempt(make)` in the server's loop."""
        return self.run(attempt(make))

    def ok(self, make: Callable[[], Awaitable[T]]) -> T:
        """The response of a call that must succeed."""
        return self.run(_await(make))


def _identity(data: bytes) -> bytes:
    return data


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def _create_database(admin_uri: str, template: str, name: str) -> None:
    admin = await asyncpg.connect(admin_uri)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()


async def _drop_database(admin_uri: str, name: str) -> None:
    admin = await asyncpg.connect(admin_uri)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _garbage_batch(h: Harness, rounds: int, salt: str) -> None:
    """Cheap nonsense for every RPC (no password hashing), `rounds` times, 25 rounds at a
    time. Every request is distinct and reaches the service's own code (the answers are
    checked), and a round carries about 60 KB of tokens, 30 KB of them through Validate's
    verification path: a server that kept what it was sent, or cached what it rejected,
    would grow by more than 50 MB in 2500 rounds."""
    stub = h.live.stub

    async def one(i: int) -> None:
        junk = f"{salt}-{i}-" + "x" * (7000 + i % 1000)
        segment = junk[:3000]
        answers = await asyncio.gather(
            attempt(lambda: stub.Validate(auth_pb2.ValidateRequest(access_token=junk))),
            attempt(lambda: stub.Validate(auth_pb2.ValidateRequest(access_token=junk + "."))),
            attempt(
                lambda: stub.Validate(
                    auth_pb2.ValidateRequest(access_token=f"eyJ{segment}.eyJ{segment}.sig")
                )
            ),
            attempt(lambda: stub.Validate(auth_pb2.ValidateRequest(access_token=f"a.{junk}.b"))),
            attempt(lambda: stub.Refresh(auth_pb2.RefreshRequest(refresh_token=junk))),
            attempt(lambda: stub.Revoke(auth_pb2.RevokeRequest(access_token=junk))),
            attempt(
                lambda: stub.Revoke(
                    auth_pb2.RevokeRequest(session_id=junk[:200]),
                    metadata=(("authorization", f"Bearer {junk[:200]}"),),
                )
            ),
            attempt(lambda: h.raw["Validate"](junk.encode() * 2)),
            attempt(lambda: stub.GetJwks(auth_pb2.GetJwksRequest())),
        )
        reasons = [reason for _, reason in answers]
        assert reasons == [OK] * 4 + [
            "REFRESH_TOKEN_INVALID",
            OK,
            "CALLER_UNAUTHENTICATED",
            "INVALID_ARGUMENT",
            OK,
        ], reasons

    for first in range(0, rounds, 25):
        await asyncio.gather(*(one(i) for i in range(first, min(rounds, first + 25))))
    for i in range(max(1, rounds // 100)):  # and a few failed logins
        credentials = auth_pb2.PasswordCredentials(username=f"{salt}-{i}", password="wrong")
        _, reason = await attempt(
            lambda: stub.Issue(auth_pb2.IssueRequest(password=credentials))  # noqa: B023
        )
        assert reason == "INVALID_CREDENTIALS"


@pytest.fixture(scope="module")
def harness(
    pg_admin_uri: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    name = f"t_fuzz_{uuid.uuid4().hex[:12]}"
    loop.run_until_complete(_create_database(pg_admin_uri, template_database, name))
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_uri(pg_admin_uri, name),
        data_dir=Path(tmp_path_factory.mktemp("fuzz")) / "data",
        kek=TEST_KEK,
        db_timeout=5.0,
        throttle_user_failures=10**6,
        throttle_peer_failures=10**6,
    )
    live = loop.run_until_complete(start_live_server(settings, ManualClock(start=1_900_000_000.0)))
    try:
        user = loop.run_until_complete(live.create_user(KNOWN_USER, scopes=tuple(USER_SCOPES)))
        pair = loop.run_until_complete(live.login(KNOWN_USER))
        h = Harness(loop=loop, live=live, subject=str(user.id), pair=pair)
        for rpc in RESPONSES:
            h.raw[rpc] = live.channel.unary_unary(
                f"/auth.v1.AuthService/{rpc}",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
        h.run(_garbage_batch(h, 200, "warm-up"))
        h.baseline_rss = rss()
        yield h
    finally:
        loop.run_until_complete(stop_live_server(live))
        loop.run_until_complete(_drop_database(pg_admin_uri, name))
        loop.close()


# The fuzz tests


def test_issue_answers_only_documented_errors(harness: Harness) -> None:
    h = harness
    seen: list[str] = []
    usernames = st.one_of(
        texts,
        plain_texts,
        st.just(KNOWN_USER),
        st.sampled_from(
            [
                KNOWN_USER.upper(),
                KNOWN_USER + " ",
                " " + KNOWN_USER,
                KNOWN_USER + "\x00",
                KNOWN_USER + "\u0301",
                KNOWN_USER + "\u200b",
                KNOWN_USER.replace("-", "\u2010"),
            ]
        ),
    )
    passwords = st.one_of(texts, plain_texts, st.just(PASSWORD), st.just(PASSWORD.upper()))
    audiences = st.one_of(st.just(""), texts, plain_texts, st.just(DEFAULT_AUDIENCE))

    @fuzz_settings(150)
    @given(
        has_credentials=st.sampled_from([True] * 7 + [False]),
        credentials=st.one_of(st.tuples(usernames, passwords), st.just((KNOWN_USER, PASSWORD))),
        scopes=scope_lists,
        audience=audiences,
    )
    # Every branch of the oracle, whatever the derandomized draws reach.
    @example(True, (KNOWN_USER, PASSWORD), [], "")
    @example(True, (KNOWN_USER, PASSWORD), ["admin"], "")
    @example(True, (KNOWN_USER, "wrong password"), [], "")
    @example(False, (KNOWN_USER, PASSWORD), [], "")
    def check(
        has_credentials: bool, credentials: tuple[str, str], scopes: list[str], audience: str
    ) -> None:
        username, password = credentials
        request = auth_pb2.IssueRequest(scopes=scopes, audience=audience)
        if has_credentials:
            request.password.CopyFrom(
                auth_pb2.PasswordCredentials(username=username, password=password)
            )
        invalid = (
            not has_credentials
            or bad_text(username, MAX_USERNAME_BYTES)
            or username_key_too_long(username)
            or bad_text(password, MAX_PASSWORD_BYTES)
            or scopes_invalid(scopes)
            or bad_optional_text(audience, MAX_AUDIENCE_BYTES)
            or audience not in ("", DEFAULT_AUDIENCE)  # only configured audiences are issued
        )
        if invalid:
            expected = "INVALID_ARGUMENT"
        # Usernames compare by their canonical key: KNOWN_USER.upper() is the same account.
        elif username_key(username) == username_key(KNOWN_USER) and password == PASSWORD:
            expected = OK if set(scopes) <= USER_SCOPES else "SCOPE_NOT_ALLOWED"
        else:
            expected = "INVALID_CREDENTIALS"

        response, reason = h.attempt(lambda: h.live.stub.Issue(request, timeout=CALL_TIMEOUT))
        seen.append(reason)
        assert reason == expected
        if response is None:
            return
        tokens = response.tokens
        assert set(tokens.scopes) == (set(scopes) or USER_SCOPES)
        verdict = h.ok(
            lambda: h.live.stub.Validate(
                auth_pb2.ValidateRequest(access_token=tokens.access_token, audience=audience),
                timeout=CALL_TIMEOUT,
            )
        )
        assert verdict.valid, verdict
        assert verdict.subject == h.subject

    check()
    # The strategies reach every branch of the oracle, not just the field checks.
    assert {OK, "INVALID_CREDENTIALS", "SCOPE_NOT_ALLOWED", "INVALID_ARGUMENT"} <= set(seen)


def test_refresh_answers_only_documented_errors(harness: Harness) -> None:
    h = harness
    seen: list[str] = []
    real = h.pair.refresh_token
    tokens = st.one_of(texts, plain_texts, mutations(real, len(real)), st.just(real + "A"))

    @fuzz_settings(150)
    @given(token=tokens)
    def check(token: str) -> None:
        assert token != real
        invalid = bad_text(token, MAX_TOKEN_BYTES)
        expected = "INVALID_ARGUMENT" if invalid else "REFRESH_TOKEN_INVALID"
        request = auth_pb2.RefreshRequest(refresh_token=token)
        _, reason = h.attempt(lambda: h.live.stub.Refresh(request, timeout=CALL_TIMEOUT))
        seen.append(reason)
        assert reason == expected

    check()
    assert {"REFRESH_TOKEN_INVALID", "INVALID_ARGUMENT"} <= set(seen)


def test_validate_answers_ok_and_rejects_garbage(harness: Harness) -> None:
    h = harness
    seen: list[str] = []
    real = h.pair.access_token
    signed_part = real.rindex(".")
    tokens = st.one_of(texts, plain_texts, mutations(real, signed_part), st.just(real))
    audiences = st.one_of(st.just(""), texts, plain_texts, st.just(DEFAULT_AUDIENCE))

    @fuzz_settings(200)
    @given(token=tokens, required=scope_lists, audience=audiences)
    def check(token: str, required: list[str], audience: str) -> None:
        invalid = (
            bad_text(token, MAX_TOKEN_BYTES)
            or scopes_invalid(required)
            or bad_optional_text(audience, MAX_AUDIENCE_BYTES)
        )
        request = auth_pb2.ValidateRequest(
            access_token=token, required_scopes=required, audience=audience
        )
        verdict, reason = h.attempt(lambda: h.live.stub.Validate(request, timeout=CALL_TIMEOUT))
        seen.append(reason if verdict is None else f"valid={verdict.valid}")
        assert reason == ("INVALID_ARGUMENT" if invalid else OK)
        if verdict is None:
            return
        if token != real:
            assert not verdict.valid, verdict
            assert verdict.error != auth_pb2.VALIDATION_ERROR_UNSPECIFIED
            assert not verdict.subject
            assert not verdict.session_id
            return
        if audience and audience != DEFAULT_AUDIENCE:
            assert (verdict.valid, verdict.error) == (
                False,
                auth_pb2.VALIDATION_ERROR_WRONG_AUDIENCE,
            )
        elif not set(required) <= USER_SCOPES:
            assert (verdict.valid, verdict.error) == (
                False,
                auth_pb2.VALIDATION_ERROR_INSUFFICIENT_SCOPE,
            )
        else:
            assert verdict.valid
            assert verdict.subject == h.subject

    check()
    assert {"valid=True", "valid=False", "INVALID_ARGUMENT"} <= set(seen)


def test_revoke_answers_only_documented_errors(harness: Harness) -> None:
    h = harness
    seen: list[str] = []
    access, refresh = h.pair.access_token, h.pair.refresh_token
    values = st.one_of(
        texts,
        plain_texts,
        mutations(access, access.rindex(".")),
        mutations(refresh, len(refresh)),
        st.just(h.pair.session_id + "x"),
        st.just(h.subject.upper()),
        st.just(str(uuid.UUID(int=0))),
    )
    authorizations = st.one_of(
        st.none(),
        st.builds(
            str.__add__,
            st.sampled_from(["", "Bearer ", "bearer ", "BEARER ", "Basic ", "Bearer", "Bearer  "]),
            header_texts,
        ),
        st.sampled_from(["Bearer " + access, "bearer " + access]),
        # A damaged token (whitespace around the real one is not damage: filtered out).
        st.builds(str.__add__, st.just("Bearer "), mutations(access, access.rindex("."))).filter(
            lambda v: v.isascii() and v.isprintable() and access not in v.split()
        ),
    )

    @fuzz_settings(200)
    @given(
        target=st.sampled_from(["refresh_token", "access_token", "session_id", "subject", ""]),
        value=values,
        authorization=authorizations,
    )
    def check(target: str, value: str, authorization: str | None) -> None:
        assert value not in (access, refresh, h.pair.session_id, h.subject)
        request = auth_pb2.RevokeRequest(**({target: value} if target else {}))
        limit = MAX_TOKEN_BYTES if target in ("refresh_token", "access_token") else MAX_ID_BYTES
        if not target or bad_text(value, limit):
            expected = "INVALID_ARGUMENT"
        elif target in ("refresh_token", "access_token"):
            expected = OK
        else:
            # One refusal whether or not the caller's token is live (no oracle).
            expected = "CALLER_UNAUTHENTICATED"
        metadata = () if authorization is None else (("authorization", authorization),)
        response, reason = h.attempt(
            lambda: h.live.stub.Revoke(request, metadata=metadata, timeout=CALL_TIMEOUT)
        )
        seen.append(f"{target or 'no target'}: {reason}")
        assert reason == expected
        if response is not None:
            assert response.revoked_sessions == 0

    check()
    assert {OK, "INVALID_ARGUMENT", "CALLER_UNAUTHENTICATED"} <= {
        outcome.partition(": ")[2] for outcome in seen
    }
    # Nothing above revoked the real session.
    verdict = h.ok(lambda: h.live.stub.Validate(auth_pb2.ValidateRequest(access_token=access)))
    assert verdict.valid


def test_raw_bytes_answer_only_documented_errors(harness: Harness) -> None:
    h = harness
    seen: list[str] = []

    @fuzz_settings(300)
    @given(rpc=st.sampled_from(sorted(RESPONSES)), body=raw_bodies)
    def check(rpc: str, body: bytes) -> None:
        answer, reason = h.attempt(lambda: h.raw[rpc](body, timeout=CALL_TIMEOUT))
        seen.append(f"{rpc}: {reason}")
        assert reason in RAW_REASONS[rpc], (rpc, reason)
        if answer is None:
            return
        response = RESPONSES[rpc](answer)
        if rpc == "Validate":
            assert not response.valid
            assert response.error != auth_pb2.VALIDATION_ERROR_UNSPECIFIED
        elif rpc == "Revoke":
            assert response.revoked_sessions == 0
        elif rpc == "GetJwks":
            assert json.loads(response.jwks_json)["keys"]

    check()
    # Some bytes parsed into requests that reached the service's own checks.
    assert {"Validate: OK", "Refresh: REFRESH_TOKEN_INVALID", "GetJwks: OK"} <= set(seen)


def test_server_still_serves_and_memory_stays_bounded(harness: Harness) -> None:
    """Runs last: after every fuzz test above (and a large batch of its own, so the check
    means something when run alone) the server still answers GetJwks and a real login,
    and the process (server included) grew by less than 50 MB since the warm-up."""
    h = harness
    h.run(_garbage_batch(h, 2500, "main"))
    grown = rss() - h.baseline_rss
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"

    jwks = h.ok(lambda: h.live.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT))
    keys = json.loads(jwks.jwks_json)["keys"]
    assert keys
    assert all(k["use"] == "sig" for k in keys)
    pair = h.run(h.live.login(KNOWN_USER))
    verdict = h.ok(
        lambda: h.live.stub.Validate(
            auth_pb2.ValidateRequest(access_token=pair.access_token, required_scopes=["read"]),
            timeout=CALL_TIMEOUT,
        )
    )
    assert verdict.valid
    assert verdict.subject == h.subject
    assert verdict.session_id == pair.session_id
    # The session from the start survived every fuzzed Revoke.
    verdict = h.ok(
        lambda: h.live.stub.Validate(
            auth_pb2.ValidateRequest(access_token=h.pair.access_token), timeout=CALL_TIMEOUT
        )
    )
    assert verdict.valid
