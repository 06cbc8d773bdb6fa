"""The Node.js example (examples/node) against the real server.

`npm ci` runs first when examples/node/node_modules is missing or older than
package-lock.json; a failing `npm ci` fails the test with npm's output. The tests are
skipped only where `node` is not on PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.clock import ManualClock
from tests.live_server import PASSWORD, LiveServer, ServerFactory

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
NPM_CI_TIMEOUT = 180.0
NODE_TIMEOUT = 60.0

# A first run may spend most of its time in `npm ci`.
pytestmark = [pytest.mark.system, pytest.mark.timeout(NPM_CI_TIMEOUT + 2 * NODE_TIMEOUT)]  # Node.js

FULL_FLOW = [
    "issue_wrong_password",
    "issue",
    "validate",
    "refresh",
    "validate_refreshed",
    "jwks",
    "verify_offline",
    "verify_local",
    "verify_tampered",
    "revoke",
    "validate_after_revoke",
    "local_after_revoke",
    "offline_after_revoke",
    "refresh_after_revoke",
    "done",
]


@pytest.fixture
def clock() -> ManualClock:
    """The wall clock's time, held still: jose in the Node process checks "exp" against
    the real time, so tokens must not be minted in the future as the default clock does."""
    return ManualClock()


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not on PATH: the Node.js example (examples/node) needs Node.js 20+")
    return path


_installed = False


async def ensure_node_modules() -> None:
    """`npm ci` unless node_modules is already installed from the current lockfile."""
    global _installed
    lock = EXAMPLE_DIR / "package-lock.json"
    # npm writes this hidden lockfile last, when an install completes.
    stamp = EXAMPLE_DIR / "node_modules" / ".package-lock.json"
    if _installed or (stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime):
        _installed = True
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is on PATH but npm is not: cannot install examples/node")
    process = await asyncio.create_subprocess_exec(
        npm,
        "ci",
        "--no-audit",
        "--no-fund",
        cwd=EXAMPLE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), NPM_CI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"npm ci in {EXAMPLE_DIR} took more than {NPM_CI_TIMEOUT:.0f} s")
    if process.returncode != 0:
        pytest.fail(
            f"npm ci in {EXAMPLE_DIR} failed (exit {process.returncode}):\n"
            + output.decode(errors="replace")
        )
    _installed = True


async def run_example(node: str, env: dict[str, str]) -> tuple[int, list[dict[str, Any]], str]:
    """Run example.mjs without blocking the event loop the server runs in; its exit code,
    its JSON lines and its stderr."""
    await ensure_node_modules()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    full_env.update(env)
    process = await asyncio.create_subprocess_exec(
        node,
        "example.mjs",
        cwd=EXAMPLE_DIR,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"node example.mjs ran for more than {NODE_TIMEOUT:.0f} s")
    stdout, stderr = out.decode(), err.decode()
    lines = []
    for line in stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on stdout: {line!r}\nstderr:\n{stderr}")
    assert process.returncode is not None
    return process.returncode, lines, stderr


def example_env(server: LiveServer, username: str, password: str = PASSWORD) -> dict[str, str]:
    return {
        "AUTH_TARGET": server.address,
        "AUTH_USERNAME": username,
        "AUTH_PASSWORD": password,
        "AUTH_ISSUER": server.settings.issuer,
        "AUTH_AUDIENCE": server.settings.audience,
    }


def by_step(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    steps = {line["step"]: line for line in lines}
    assert len(steps) == len(lines), f"a step was printed twice: {lines}"
    return steps


async def server_kids(server: LiveServer) -> set[str]:
    response = await server.stub.GetJwks(auth_pb2.GetJwksRequest())
    return {key["kid"] for key in json.loads(response.jwks_json)["keys"]}


async def session_row(server: LiveServer, session_id: str) -> Any:
    return await server.pool.fetchrow(
        "SELECT revoked_at, revoke_reason FROM sessions WHERE id = $1", uuid.UUID(session_id)
    )


async def test_node_example_walks_the_whole_flow(server: LiveServer, node: str) -> None:
    user = await server.create_user("alice-node", scopes=("read",))
    # A session of the same user that the example's revoke must leave alone.
    bystander = await server.login("alice-node")

    code, lines, stderr = await run_example(node, example_env(server, "alice-node"))

    assert code == 0, f"exit {code}\nstdout: {lines}\nstderr:\n{stderr}"
    assert [line["step"] for line in lines] == FULL_FLOW
    assert all(line["ok"] is True for line in lines), lines
    steps = by_step(lines)
    # No token reaches the output.
    printed = json.dumps(lines)
    assert "eyJ" not in printed, "something that looks like a JWT was printed"

    wrong = steps["issue_wrong_password"]
    assert (wrong["code"], wrong["reason"], wrong["domain"]) == (
        "UNAUTHENTICATED",
        "INVALID_CREDENTIALS",
        "authsvc",
    )

    issued = steps["issue"]
    session_id = issued["session_id"]
    assert session_id != bystander.session_id
    assert issued["token_type"] == "Bearer"
    assert issued["scopes"] == ["read"]

    validated = steps["validate"]
    assert validated["valid"] is True
    assert validated["subject"] == str(user.id)
    assert validated["session_id"] == session_id
    assert validated["scopes"] == ["read"]

    refreshed = steps["refresh"]
    assert refreshed["same_session"] is True
    assert refreshed["access_token_changed"] is True
    assert refreshed["refresh_token_changed"] is True
    assert steps["validate_refreshed"]["valid"] is True
    assert steps["validate_refreshed"]["subject"] == str(user.id)

    kids = await server_kids(server)
    assert set(steps["jwks"]["kids"]) == kids
    offline = steps["verify_offline"]
    assert offline["verified"] is True
    assert offline["kid"] in kids
    assert offline["alg"] == server.settings.signing_alg
    assert offline["typ"] == "at+jwt"
    assert offline["subject"] == str(user.id)
    assert offline["session_id"] == session_id
    assert offline["issuer"] == server.settings.issuer
    assert offline["audience"] == server.settings.audience
    assert offline["matches_validate"] is True

    # The local validator (examples/node/local_validator.mjs) follows WatchRevocations.
    local = steps["verify_local"]
    assert (local["valid"], local["subject"], local["session_id"]) == (
        True,
        str(user.id),
        session_id,
    )
    assert local["matches_validate"] is True

    tampered = steps["verify_tampered"]
    assert tampered["rejected_offline"] is True
    assert tampered["offline_error"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"
    assert tampered["valid_online"] is False
    assert tampered["online_error"] == "VALIDATION_ERROR_BAD_SIGNATURE"

    assert steps["revoke"]["revoked_sessions"] == 1
    assert steps["validate_after_revoke"] == {
        "step": "validate_after_revoke",
        "ok": True,
        "valid": False,
        "error": "VALIDATION_ERROR_REVOKED",
    }
    # The revocation reached the local validator through the stream, with no call: it
    # refuses the token (within the 2 s the example waits) and never asked Validate.
    after = steps["local_after_revoke"]
    assert (after["valid"], after["error"]) == (False, "VALIDATION_ERROR_REVOKED")
    assert after["within_ms"] < 2000
    assert after["fallbacks"] == 0
    # Plain offline verification cannot see the revoke: that is the point the example makes.
    assert steps["offline_after_revoke"]["still_verifies_offline"] is True
    assert steps["refresh_after_revoke"]["reason"] == "SESSION_REVOKED"

    # From Python: the example's session is revoked in the database, revoking it again by
    # id is refused (it ends nothing: tests/security/test_revoke_oracle.py) and changes
    # nothing, and the bystander session still validates.
    row = await session_row(server, session_id)
    assert row is not None
    assert row["revoked_at"] is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Revoke(
            auth_pb2.RevokeRequest(session_id=session_id),
            metadata=(("authorization", f"Bearer {bystander.access_token}"),),
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await session_row(server, session_id)) == row
    check = await server.stub.Validate(
        auth_pb2.ValidateRequest(access_token=bystander.access_token)
    )
    assert check.valid, check
    assert check.session_id == bystander.session_id


async def test_node_example_checks_issuer_and_audience_offline(
    server_factory: ServerFactory, node: str
) -> None:
    server = await server_factory(issuer="https://auth.example.test", audience="orders-api")
    await server.create_user("alice-node", scopes=("read",))
    env = example_env(server, "alice-node")

    # Expecting the defaults ("authsvc"): offline verification must refuse the token.
    wrong_env = {k: v for k, v in env.items() if k not in ("AUTH_ISSUER", "AUTH_AUDIENCE")}
    code, lines, stderr = await run_example(node, wrong_env)
    assert code == 1, f"exit {code}\nstdout: {lines}\nstderr:\n{stderr}"
    assert [line["step"] for line in lines] == FULL_FLOW[: FULL_FLOW.index("verify_offline") + 1]
    assert all(line["ok"] for line in lines[:-1])
    failure = lines[-1]
    assert failure["ok"] is False
    assert failure["step"] == "verify_offline"
    assert failure["code"] == "ERR_JWT_CLAIM_VALIDATION_FAILED"
    assert failure["claim"] == "iss"
    # It stopped there: the session it started was not revoked.
    row = await session_row(server, by_step(lines)["issue"]["session_id"])
    assert row is not None
    assert row["revoked_at"] is None

    # Told the server's issuer and audience, it goes all the way.
    code, lines, stderr = await run_example(node, env)
    assert code == 0, f"exit {code}\nstdout: {lines}\nstderr:\n{stderr}"
    offline = by_step(lines)["verify_offline"]
    assert offline["issuer"] == "https://auth.example.test"
    assert offline["audience"] == "orders-api"


async def test_node_example_fails_with_the_error_reason(server: LiveServer, node: str) -> None:
    await server.create_user("alice-node", scopes=("read",))

    code, lines, stderr = await run_example(
        node, example_env(server, "alice-node", password="not the password")
    )

    assert code == 1, f"exit {code}\nstdout: {lines}\nstderr:\n{stderr}"
    assert [line["step"] for line in lines] == ["issue_wrong_password", "issue"]
    failure = lines[-1]
    assert failure["ok"] is False
    assert failure["code"] == grpc.StatusCode.UNAUTHENTICATED.name
    assert failure["reason"] == "INVALID_CREDENTIALS"
