"""No token, password or key material in any log line (rule: secrets never reach logs)."""

from __future__ import annotations

import base64
import logging

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from tests.helpers import refresh
from tests.live_server import PASSWORD, TEST_KEK, LiveServer, SecretsSeen, ServerFactory


async def test_a_whole_session_life_logs_no_secret(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await server_factory(refresh_reuse_grace=0, throttle_user_failures=1)
    await server.create_user("quinn", scopes=("read",))
    secrets_seen: list[str] = [PASSWORD, "wrong password 1", "wrong password 2"]

    pair = await server.login("quinn")
    child = await refresh(server, pair.refresh_token)
    secrets_seen += [pair.access_token, pair.refresh_token, child.access_token, child.refresh_token]
    with pytest.raises(grpc.aio.AioRpcError):  # reuse: logged as a security event
        await refresh(server, pair.refresh_token)
    for wrong in ("wrong password 1", "wrong password 2"):
        with pytest.raises(grpc.aio.AioRpcError):
            await server.login("quinn", password=wrong)
    with pytest.raises(grpc.aio.AioRpcError):  # throttled: logged
        await server.login("quinn")
    await server.stub.Validate(auth_pb2.ValidateRequest(access_token=child.access_token + "x"))
    await server.running.components.users.set_disabled("quinn", True)

    text = caplog.text
    assert "reuse detected" in text, "the security events were logged at all"
    assert "throttled" in text
    for secret in secrets_seen:
        assert secret not in text
    # Nor the key-encryption key, in any usual spelling.
    for spelling in (base64.b64encode(TEST_KEK).decode(), TEST_KEK.hex()):
        assert spelling not in text


async def test_every_test_is_checked_for_the_secrets_it_used(
    server: LiveServer, secrets_seen: SecretsSeen, caplog: pytest.LogCaptureFixture
) -> None:
    """The autouse check in conftest sees what went through the server's channel, and
    would fail a test whose logs held any of it."""
    await server.create_user("rita")
    pair = await server.login("rita")
    assert {PASSWORD, pair.access_token, pair.refresh_token} <= secrets_seen.values
    assert secrets_seen.leaked_into(caplog.text) == 0
    logging.getLogger("service.example").info("a careless line: %s", pair.refresh_token)
    assert secrets_seen.leaked_into(caplog.text) == 1
    caplog.clear()  # so that this test's own deliberate leak does not fail it
