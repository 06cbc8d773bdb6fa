"""What the database holds after a busy run: no refresh token, access token or
password in any form, argon2id hashes with OWASP parameters, sealed private keys."""

from __future__ import annotations

import base64
import json
import re

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from cryptography.hazmat.primitives import serialization

from service.domain.keys import open_signing_key
from service.domain.records import SigningKeyRecord
from service.domain.refresh_tokens import hash_token
from service.secrets_box import KeyDecryptionError, SecretBox
from tests.helpers import assert_error, refresh
from tests.live_server import PASSWORD, TEST_KEK, LiveServer

NEW_PASSWORD = "n3w passw0rd, with unicode: 🔑 ü"
WRONG_PASSWORD = "wrong-password-zq7"
_ARGON2_RE = re.compile(
    r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)


def b64_raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def refresh_token_forms(token: str) -> list[str]:
    """Every encoding under which a refresh token could sit in a row_to_json dump."""
    raw = b64_raw(token)
    assert len(raw) == 32
    return [
        token,
        raw.hex(),
        token.encode().hex(),  # the token text stored as bytea
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
    ]


def access_token_forms(token: str) -> list[str]:
    _, payload, signature = token.split(".")
    return [token, signature, token.encode().hex(), f"{payload}.{signature}"]


def password_forms(password: str) -> list[str]:
    raw = password.encode()
    return [
        password,
        json.dumps(password)[1:-1],  # as it would appear escaped inside JSON text
        raw.hex(),
        base64.b64encode(raw).decode(),
    ]


async def dump_database(server: LiveServer) -> dict[str, list[str]]:
    """Every row of every table of the public schema, as JSON text."""
    dump: dict[str, list[str]] = {}
    async with server.pool.acquire() as conn:
        tables = await conn.fetch(
            """SELECT table_name FROM information_schema.tables
               WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
               ORDER BY table_name"""
        )
        for row in tables:
            name = row["table_name"]
            quoted = '"' + name.replace('"', '""') + '"'
            rows = await conn.fetch(f"SELECT row_to_json(t)::text AS j FROM {quoted} t")
            dump[name] = [r["j"] for r in rows]
    return dump


async def busy_run(server: LiveServer) -> tuple[list[str], list[str], list[str]]:
    """Logins, rotations, grace replays, revocations, reuse, a password change.

    Returns every refresh token, access token and password the run used.
    """
    refresh_tokens: list[str] = []
    access_tokens: list[str] = []

    def keep(pair: auth_pb2.TokenPair) -> auth_pb2.TokenPair:
        refresh_tokens.append(pair.refresh_token)
        access_tokens.append(pair.access_token)
        return pair

    await server.create_user("alice", scopes=("read", "write"))
    await server.create_user("bob", scopes=("read",))

    # Rotation, a grace replay (same child), then reuse after the child was used.
    first = keep(await server.login("alice"))
    child = keep(await refresh(server, first.refresh_token))
    replay = keep(await refresh(server, first.refresh_token))
    assert replay.refresh_token == child.refresh_token
    grandchild = keep(await refresh(server, child.refresh_token))
    keep(await refresh(server, grandchild.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refresh(server, first.refresh_token)
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")

    # Revocations by every target.
    by_refresh = keep(await server.login("alice"))
    keep(await refresh(server, by_refresh.refresh_token))
    revoked = await server.stub.Revoke(
        auth_pb2.RevokeRequest(refresh_token=by_refresh.refresh_token)
    )
    assert revoked.revoked_sessions == 1
    by_access = keep(await server.login("bob"))
    revoked = await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=by_access.access_token))
    assert revoked.revoked_sessions == 1
    by_session = keep(await server.login("bob"))
    revoked = await server.stub.Revoke(
        auth_pb2.RevokeRequest(session_id=by_session.session_id),
        metadata=(("authorization", f"Bearer {by_session.access_token}"),),
    )
    assert revoked.revoked_sessions == 1

    # A failed login, a password change (which ends alice's live sessions), a new login.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("alice", password=WRONG_PASSWORD)
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    live = keep(await server.login("alice"))
    await server.running.components.users.set_password("alice", NEW_PASSWORD)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refresh(server, live.refresh_token)
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    after = keep(await server.login("alice", password=NEW_PASSWORD))
    keep(await refresh(server, after.refresh_token))
    # Left live and unused on purpose: the newest token of a live session.
    keep(await server.login("bob"))

    assert len(set(refresh_tokens)) == len(refresh_tokens) - 1  # only the replay repeats
    return refresh_tokens, access_tokens, [PASSWORD, NEW_PASSWORD, WRONG_PASSWORD]


async def test_no_token_or_password_is_stored_in_any_form(server: LiveServer) -> None:
    refresh_tokens, access_tokens, passwords = await busy_run(server)
    dump = await dump_database(server)

    assert {"users", "sessions", "refresh_tokens", "signing_keys", "security_events"} <= set(dump)
    everything = "\n".join(line for rows in dump.values() for line in rows)
    # The scan sees bytea columns: the stored SHA-256 of each refresh token shows up as hex.
    for token in set(refresh_tokens):
        assert hash_token(token).hex() in everything, "the dump does not show token hashes"
    assert len(dump["refresh_tokens"]) == len(set(refresh_tokens))

    for token in refresh_tokens:
        for form in refresh_token_forms(token):
            assert form not in everything, f"refresh token stored as {form!r}"
    for token in access_tokens:
        for form in access_token_forms(token):
            assert form not in everything, "access token stored"
    for password in passwords:
        for form in password_forms(password):
            assert form not in everything, f"password stored as {form!r}"

    # The derivation secret that makes grace replays possible is sealed, too.
    async with server.pool.acquire() as conn:
        secrets_rows = await conn.fetch("SELECT name, sealed FROM server_secrets")
    box = SecretBox(TEST_KEK)
    assert secrets_rows
    for row in secrets_rows:
        secret = box.open(bytes(row["sealed"]), label=row["name"])
        assert secret.hex() not in everything
        assert base64.b64encode(secret).decode() not in everything


async def test_password_hashes_are_argon2id_with_owasp_parameters(server: LiveServer) -> None:
    await server.create_user("carol", scopes=("read",))
    await server.create_user("dave", scopes=("read",))
    async with server.pool.acquire() as conn:
        before = {
            r["username"]: r["password_hash"]
            for r in await conn.fetch("SELECT username, password_hash FROM users")
        }
    assert set(before) == {"carol", "dave"}
    # Same password, different salts: different hashes.
    assert before["carol"] != before["dave"]
    for password_hash in before.values():
        assert password_hash.startswith("$argon2id$")
        match = _ARGON2_RE.fullmatch(password_hash)
        assert match is not None, password_hash
        memory, time_cost, parallelism = (int(g) for g in match.groups())
        assert memory >= 19_456
        assert time_cost >= 2
        assert parallelism >= 1

    await server.running.components.users.set_password("carol", NEW_PASSWORD)
    async with server.pool.acquire() as conn:
        after = await conn.fetchval("SELECT password_hash FROM users WHERE username = 'carol'")
    assert after != before["carol"]
    assert _ARGON2_RE.fullmatch(after) is not None
    await server.login("carol", password=NEW_PASSWORD)


async def test_private_signing_keys_are_sealed(server: LiveServer) -> None:
    async with server.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM signing_keys")
    assert len(rows) == 1
    row = rows[0]
    sealed = bytes(row["private_key_sealed"])
    record = SigningKeyRecord(
        kid=row["kid"],
        alg=row["alg"],
        public_jwk=json.loads(row["public_jwk"]),
        private_key_sealed=sealed,
        created_at=row["created_at"],
        activates_at=row["activates_at"],
        retired_at=row["retired_at"],
    )
    key = open_signing_key(record, SecretBox(TEST_KEK))
    der = key.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der not in sealed
    # Not even a 16-byte run of the private key is visible (Ed25519's seed is 32 bytes).
    assert all(der[i : i + 16] not in sealed for i in range(len(der) - 16))
    jwk = record.public_jwk
    assert "d" not in jwk
    assert jwk["kid"] == key.kid

    # Another KEK cannot open it.
    with pytest.raises(KeyDecryptionError, match="AUTH_KEK does not open"):
        open_signing_key(record, SecretBox(bytes(32)))
    dump = "\n".join(line for rows in (await dump_database(server)).values() for line in rows)
    assert der.hex() not in dump
