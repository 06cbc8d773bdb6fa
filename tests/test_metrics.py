"""Prometheus metrics of a real server: what the service does shows up on /metrics, and
with `--workers` the supervisor's /metrics adds up every worker exactly."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.loadtest.server_process import ServeCommand, serving
from tests.helpers import refresh, refresh_fails
from tests.live_server import PASSWORD, LiveServer, ServerFactory
from tests.test_cli import _authsvc, _server_env
from tests.watching import Watch

AUTH = "/auth.v1.AuthService/"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def calls(samples: Samples, method: str, code: str) -> float:
    return value(samples, "authsvc_rpc_calls_total", method=AUTH + method, code=code)


async def scraped(live: LiveServer) -> Samples:
    endpoint = live.running.metrics_endpoint
    assert endpoint is not None
    return await asyncio.to_thread(scrape, endpoint.port)


async def test_what_the_service_does_shows_on_metrics(server_factory: ServerFactory) -> None:
    live = await server_factory(metrics_listen="127.0.0.1:0")
    await live.create_user("mia", scopes=("read",))
    pair = await live.login("mia")
    with pytest.raises(grpc.aio.AioRpcError):
        await live.login("mia", password="wrong password")
    for _ in range(3):
        verdict = await live.stub.Validate(auth_pb2.ValidateRequest(access_token=pair.access_token))
        assert verdict.valid
    child = await refresh(live, pair.refresh_token)
    live.clock.advance(live.settings.refresh_reuse_grace + 1)
    await refresh_fails(live, pair.refresh_token, "REFRESH_TOKEN_REUSED")
    second = await live.login("mia")
    await live.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=second.refresh_token))
    admin = admin_pb2_grpc.AdminServiceStub(live.channel)
    await admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest())
    assert child.refresh_token

    # Calls are counted as they finish; sampled values within the sampler's second.
    deadline = time.monotonic() + 5
    samples = await scraped(live)
    while value(samples, "authsvc_token_cache_hits_total") < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        samples = await scraped(live)

    assert calls(samples, "Issue", "OK") == 2
    assert calls(samples, "Issue", "UNAUTHENTICATED") == 1
    assert calls(samples, "Validate", "OK") == 3
    assert calls(samples, "Refresh", "OK") == 1
    assert calls(samples, "Refresh", "UNAUTHENTICATED") == 1
    assert calls(samples, "Revoke", "OK") == 1
    assert (
        value(
            samples,
            "authsvc_rpc_calls_total",
            method="/auth.v1.AdminService/RotateSigningKey",
            code="OK",
        )
        == 1
    )
    assert value(samples, "authsvc_rpc_duration_seconds_count", method=AUTH + "Validate") == 3
    assert value(samples, "authsvc_logins_total", outcome="succeeded") == 2
    assert value(samples, "authsvc_logins_total", outcome="failed") == 1
    assert value(samples, "authsvc_refresh_reuse_detected_total") == 1
    assert value(samples, "authsvc_sessions_revoked_total", target="reuse") == 1
    assert value(samples, "authsvc_sessions_revoked_total", target="refresh_token") == 1
    assert value(samples, "authsvc_signing_key_rotations_total") == 1
    # The first Validate verified the signature; the other two were cache hits.
    assert value(samples, "authsvc_token_cache_misses_total") >= 1
    assert value(samples, "authsvc_token_cache_hits_total") >= 2
    assert value(samples, "authsvc_revoked_sessions") == 2
    assert value(samples, "authsvc_revocation_listener_up") == 1
    assert value(samples, "authsvc_db_pool_max_connections") == live.settings.db_pool_size
    assert value(samples, "authsvc_db_pool_connections", state="idle") >= 1
    # No token or password ever reaches the metrics.
    text = str(samples)
    for secret in (pair.access_token, pair.refresh_token, PASSWORD):
        assert secret not in text


async def test_revocation_lag_is_measured_between_replicas(server_factory: ServerFactory) -> None:
    first = await server_factory(metrics_listen="127.0.0.1:0")
    second = await server_factory(metrics_listen="127.0.0.1:0")
    await first.create_user("lee")
    pair = await first.login("lee")
    await first.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token))
    deadline = time.monotonic() + 5
    samples = await scraped(second)
    while ("authsvc_revocation_lag_seconds", frozenset()) not in samples:
        assert time.monotonic() < deadline, "no revocation lag sampled"
        await asyncio.sleep(0.2)
        samples = await scraped(second)
    # The ManualClock stands still, so the lag the second replica saw is 0.
    assert value(samples, "authsvc_revocation_lag_seconds") == 0.0


@pytest.mark.system
def test_workers_add_up_on_the_supervisors_metrics(database_url: str, tmp_path: Path) -> None:
    env = _server_env(
        database_url,
        tmp_path,
        AUTH_METRICS_LISTEN="127.0.0.1:0",
        AUTH_DB_POOL_SIZE="3",
    )
    created = _authsvc("users", "create", "wes", "--password-stdin", env=env, stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    with serving(ServeCommand(env, workers=2), at_end="stop_cleanly") as server:
        port, metrics_port = server.port, server.metrics_port
        assert metrics_port is not None, "no metrics address in the banner"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            login = stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username="wes", password=PASSWORD)
                ),
                timeout=10,
            )
        token = login.tokens.access_token
        calls_made = 40
        for _ in range(calls_made):
            # A connection of its own each time: the kernel spreads them over both workers.
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as each:
                verdict = auth_pb2_grpc.AuthServiceStub(each).Validate(
                    auth_pb2.ValidateRequest(access_token=token), timeout=5
                )
                assert verdict.valid
        deadline = time.monotonic() + 10
        samples = scrape(metrics_port)
        # Sampled once a second: the listeners may connect just after the first sample.
        while (
            value(samples, "authsvc_db_pool_max_connections") < 6
            or value(samples, "authsvc_revocation_listener_up") < 1
        ):
            assert time.monotonic() < deadline, "both workers' gauges never showed"
            time.sleep(0.3)
            samples = scrape(metrics_port)
        assert calls(samples, "Validate", "OK") == calls_made
        assert calls(samples, "Issue", "OK") == 1
        assert value(samples, "authsvc_logins_total", outcome="succeeded") == 1
        # Both workers are in the sums: two pools of 3.
        assert value(samples, "authsvc_db_pool_max_connections") == 6
        assert value(samples, "authsvc_revocation_listener_up") == 1


async def test_the_revocation_log_position_and_watchers_show_on_metrics(
    server_factory: ServerFactory,
) -> None:
    live = await server_factory(metrics_listen="127.0.0.1:0", watch_heartbeat=0.1)
    await live.create_user("noa")
    pair = await live.login("noa")
    await live.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token))
    head = await live.pool.fetchval("SELECT sequence FROM revocation_log_head")
    watch = Watch.open(live.channel)
    await watch.until(lambda w: len(w.updates) >= 3, what="a snapshot and heartbeats")
    deadline = time.monotonic() + 5
    samples = await scraped(live)
    while value(samples, "authsvc_revocation_watchers") < 1:
        assert time.monotonic() < deadline, "no watcher sampled"
        await asyncio.sleep(0.2)
        samples = await scraped(live)
    assert value(samples, "authsvc_revocation_log_sequence") == head
    assert value(samples, "authsvc_revocation_watch_updates_total") >= 1
    assert value(samples, "authsvc_revocation_watchers_cut_off_total") == 0
    await watch.close()
