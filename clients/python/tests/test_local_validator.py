"""LocalValidator against an in-process fake authsvc: the first snapshot, every check with
the server's reason, revocations of sessions and users pushed by the stream, the hot-token
cache, reconnects that resume, compaction, staleness and its fallback, an older server."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from datetime import UTC, datetime

import grpc
import pytest
from authsvc_client.client import AuthServiceError
from authsvc_client.local_validator import LocalValidator
from fake_authsvc import FakeAuthsvc, ManualClock, Signer, ValidatorFactory, b64, until


async def test_start_returns_after_the_snapshot_and_a_good_token_gets_every_field(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, wall: ManualClock
) -> None:
    v = await make_validator()
    assert v.fresh
    assert v.snapshots_applied == 1
    assert fake.watch_requests == [0]
    claims = fake.claims(sub="alice", sid="s-1", scope="read write", jti="j-1")
    answer = v.validate(fake.keys[0].sign(claims), required_scopes=("read",))
    assert answer.valid
    assert answer.error is None
    assert (answer.subject, answer.session_id, answer.token_id) == ("alice", "s-1", "j-1")
    assert answer.scopes == ("read", "write")
    assert answer.expires_at == datetime.fromtimestamp(claims["exp"], UTC)
    assert not fake.validate_calls  # no I/O


async def test_start_times_out_when_no_snapshot_comes(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    fake.watch_mode = "hold"
    v = await make_validator(start=False)
    with pytest.raises(TimeoutError):
        await v.start(timeout=0.3)
    assert v.validate(fake.token()).error == "VERIFIER_STALE"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_every_algorithm_authsvc_signs_with_verifies(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, alg: str
) -> None:
    fake.keys = [Signer.generate(alg)]
    v = await make_validator()
    assert v.validate(fake.token()).valid
    tampered = fake.token()[:-6] + ("AAAAAA" if not fake.token().endswith("AAAAAA") else "BBBBBB")
    assert v.validate(tampered).error in ("BAD_SIGNATURE", "MALFORMED")


async def test_each_problem_gets_the_servers_reason(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, wall: ManualClock
) -> None:
    v = await make_validator(audience="authsvc")
    key = fake.keys[0]
    now = int(wall())
    good = fake.token()
    header, payload, signature = good.split(".")
    cases = {
        "not-a-jwt": "MALFORMED",
        "a.b": "MALFORMED",
        f"{header}.{payload}.{signature}.x": "MALFORMED",
        f"{header}.{payload}!.{signature}": "MALFORMED",
        key.sign(fake.claims(), headers={"typ": "JWT"}): "MALFORMED",
        key.sign(fake.claims(), headers={"jku": "https://evil"}): "MALFORMED",
        fake.token(iss="someone-else"): "MALFORMED",
        fake.token(sid=None): "MALFORMED",
        fake.token(sub=""): "MALFORMED",
        fake.token(exp="soon"): "MALFORMED",
        fake.token(nbf=True): "MALFORMED",
        fake.token(ugen=True): "MALFORMED",
        fake.token(ugen=-1): "MALFORMED",
        fake.token(ugen=2**63): "MALFORMED",
        fake.token(aud=[]): "MALFORMED",
        fake.token(scope=["read"]): "MALFORMED",
        # a spare bit of the last base64 character set: another spelling of one signature
        f"{header}.{payload}.{signature[:-1]}{flip_low_bit(signature[-1])}": "MALFORMED",
        key.sign(fake.claims(), headers={"kid": "x" * 16}): "BAD_SIGNATURE",
        key.sign(fake.claims(), high_s=True): "BAD_SIGNATURE",
        Signer.generate().sign(fake.claims()): "BAD_SIGNATURE",
        fake.token(exp=now): "EXPIRED",
        fake.token(exp=now - 100, iat=now - 1000): "EXPIRED",
        fake.token(iat=now + 6): "NOT_YET_VALID",
        fake.token(nbf=now + 6): "NOT_YET_VALID",
        fake.token(aud="orders"): "WRONG_AUDIENCE",
        fake.token(scope="write"): "INSUFFICIENT_SCOPE",
    }
    for token, reason in cases.items():
        answer = v.validate(token, required_scopes=("read",))
        assert answer.error == reason, (token, reason, answer.error)
        assert not answer.valid
        assert (answer.subject, answer.session_id, answer.expires_at) == ("", "", None)
    # within the start leeway, and a list audience that includes ours
    assert v.validate(fake.token(iat=now + 5, nbf=now + 5, aud=["x", "authsvc"])).valid
    assert v.validate(fake.token(ugen=None)).valid  # absent ugen is generation 0
    assert v.validate(fake.token(aud="orders"), audience="").valid  # "" checks no audience
    assert v.validate(fake.token(aud="orders"), audience="orders").valid
    # an alg header other than the key's (RS256 named on an ES256 key)
    forged_header = b64(b'{"alg":"RS256","kid":"%s","typ":"at+jwt"}' % key.kid.encode())
    assert v.validate(f"{forged_header}.{payload}.{signature}").error == "BAD_SIGNATURE"


def flip_low_bit(char: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return alphabet[alphabet.index(char) ^ 1]


async def test_leeway_is_applied_as_the_server_applies_it(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, wall: ManualClock
) -> None:
    v = await make_validator(leeway=30)
    now = int(wall())
    assert v.validate(fake.token(exp=now - 29)).valid
    assert v.validate(fake.token(exp=now - 30)).error == "EXPIRED"
    assert v.validate(fake.token(iat=now + 30)).valid
    assert v.validate(fake.token(iat=now + 31)).error == "NOT_YET_VALID"


async def test_another_issuer_is_malformed_and_says_how_to_configure_it(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake.issuer = "https://auth.example"
    v = await make_validator()
    assert v.validate(fake.token()).error == "MALFORMED"
    assert any("issuer" in r.getMessage() for r in caplog.records)
    v2 = await make_validator(issuer="https://auth.example")
    assert v2.validate(fake.token()).valid


async def test_a_revoked_session_is_refused_as_soon_as_its_update_arrives(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    token = fake.token(sid="s-9")
    assert v.validate(token).valid
    sequence = fake.revoke_session("s-9")
    await until(lambda: v.sequence == sequence)
    assert v.validate(token).error == "REVOKED"
    assert v.validate(fake.token(sid="s-10")).valid
    assert v.is_session_revoked("s-9")
    assert v.revoked_sessions == 1


async def test_a_revoked_user_refuses_tokens_below_the_generation(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    old, absent, new = (
        fake.token(sub="bob", ugen=2),
        fake.token(sub="bob", ugen=None),
        fake.token(sub="bob", ugen=3),
    )
    sequence = fake.revoke_user("bob", 3)
    await until(lambda: v.sequence == sequence)
    assert v.validate(old).error == "REVOKED"
    assert v.validate(absent).error == "REVOKED"
    assert v.validate(new).valid
    assert v.validate(fake.token(sub="carol", ugen=0)).valid
    # generations only grow: a late, lower one does not lift the higher
    sequence = fake.revoke_user("bob", 1)
    await until(lambda: v.sequence == sequence)
    assert v.validate(old).error == "REVOKED"


async def test_a_snapshot_at_start_carries_earlier_revocations(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    fake.revoke_session("s-1")
    fake.revoke_user("dan", 5)
    v = await make_validator()
    assert v.sequence == 2
    assert v.validate(fake.token(sid="s-1")).error == "REVOKED"
    assert v.validate(fake.token(sub="dan", sid="s-2", ugen=4)).error == "REVOKED"


async def test_the_hot_token_cache_never_skips_expiry_revocation_audience_or_scope(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, wall: ManualClock
) -> None:
    v = await make_validator()
    token = fake.token(sid="hot", aud="orders", scope="read")
    assert v.validate(token, ("read",), "orders").valid
    assert v.validate(token, ("read",), "orders").valid
    assert v.metrics()["verified_cache_hits"] == 1
    assert v.validate(token, ("write",), "orders").error == "INSUFFICIENT_SCOPE"
    assert v.validate(token, ("read",), "billing").error == "WRONG_AUDIENCE"
    sequence = fake.revoke_session("hot")
    await until(lambda: v.sequence == sequence)
    assert v.validate(token, ("read",), "orders").error == "REVOKED"
    other = fake.token(sid="warm")
    assert v.validate(other).valid
    wall.advance(900)
    assert v.validate(other).error == "EXPIRED"
    assert v.metrics()["verified_cache_hits"] >= 5


async def test_the_cache_is_bounded(fake: FakeAuthsvc, make_validator: ValidatorFactory) -> None:
    v = await make_validator(cache_size=2)
    tokens = [fake.token(sid=f"s-{n}") for n in range(5)]
    for token in tokens:
        assert v.validate(token).valid
    assert v.metrics()["verified_cache_entries"] == 2


async def test_a_key_dropped_from_the_jwks_refuses_its_tokens_even_cached(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    old_key = fake.keys[0]
    token = fake.token()
    assert v.validate(token).valid
    new_key = Signer.generate("EdDSA")
    sequence = fake.set_keys([old_key, new_key])
    await until(lambda: v.sequence == sequence)
    assert v.validate(token).valid
    assert v.validate(fake.token(key=new_key)).valid
    sequence = fake.set_keys([new_key])
    await until(lambda: v.sequence == sequence)
    assert v.validate(token).error == "BAD_SIGNATURE"
    assert v.validate(fake.token(key=new_key)).valid


async def test_a_dropped_stream_resumes_from_its_sequence_and_misses_nothing(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    fake.revoke_session("a")
    await until(lambda: v.sequence == 1)
    fake.drop_streams(grpc.StatusCode.UNAVAILABLE)
    await until(lambda: not fake.streams)
    # revoked while the validator is away: only the log has it
    fake.revoke_session("b")
    fake.revoke_user("eve", 1)
    await until(lambda: v.sequence == 3)
    assert fake.watch_requests[0] == 0
    assert fake.watch_requests[-1] == 1
    assert v.snapshots_applied == 1  # resumed with a delta, no second snapshot
    assert v.reconnects >= 1
    assert v.is_session_revoked("a")
    assert v.is_session_revoked("b")
    assert v.validate(fake.token(sub="eve", sid="c")).error == "REVOKED"


async def test_a_compacted_log_sends_a_snapshot_that_replaces_what_was_held(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    fake.revoke_session("old")
    fake.revoke_session("kept")
    await until(lambda: v.sequence == 2)
    fake.drop_streams()  # a clean end: reconnect too
    await until(lambda: not fake.streams)
    del fake.sessions["old"]  # forgotten by the server (past its bound)
    fake.revoke_session("new")
    fake.compact()
    await until(lambda: v.snapshots_applied == 2)
    assert v.sequence == 3
    assert not v.is_session_revoked("old")
    assert v.is_session_revoked("kept")
    assert v.is_session_revoked("new")


async def test_stale_answers_then_fallback_then_fresh_again(
    fake: FakeAuthsvc,
    make_validator: ValidatorFactory,
    mono: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    v = await make_validator(max_staleness=5.0)
    token = fake.token()
    mono.advance(4.9)
    assert v.fresh
    assert v.staleness == pytest.approx(4.9)
    assert v.validate(token).valid
    mono.advance(0.2)
    assert not v.fresh
    for _ in range(3):
        assert v.validate(token).error == "VERIFIER_STALE"
    assert v.stale_answers == 3
    answer = await v.validate_async(token, ("read",), "orders")
    assert answer.subject == "from-remote"  # authsvc's Validate answered
    assert v.fallbacks == 1
    request = fake.validate_calls[0]
    assert (request.access_token, list(request.required_scopes), request.audience) == (
        token,
        ["read"],
        "orders",
    )
    stale_lines = [r for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale_lines) == 2  # one per kind and minute, not one per call
    fake.heartbeat()
    await until(lambda: v.fresh)
    assert v.heartbeats == 1
    assert v.validate(token).valid
    assert (await v.validate_async(token)).subject == "user-1"
    assert len(fake.validate_calls) == 1


async def test_fail_closed_answers_verifier_stale_and_asks_nobody(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, mono: ManualClock
) -> None:
    v = await make_validator(fail_closed=True, max_staleness=1.0)
    mono.advance(1.5)
    answer = await v.validate_async(fake.token())
    assert not answer.valid
    assert answer.error == "VERIFIER_STALE"
    assert fake.validate_calls == []
    assert v.stale_answers == 1
    assert v.fallbacks == 0


async def test_a_quiet_stream_is_reconnected(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    """A connection that delivers nothing (no heartbeat) is given up after max_staleness
    (real seconds here) and opened again."""
    v = await make_validator(max_staleness=0.3, monotonic=time.monotonic)
    await until(lambda: len(fake.watch_requests) >= 2)
    assert v.reconnects >= 1
    assert fake.watch_requests[1] == v.sequence


async def test_heartbeats_keep_a_stream_open_and_fresh(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator(max_staleness=1.0, monotonic=time.monotonic)

    async def beat() -> None:
        while True:
            fake.heartbeat()
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(beat())
    try:
        await asyncio.sleep(2.5)  # past max_staleness: quiet, it would have reconnected
        assert fake.watch_requests == [0]
        assert v.fresh
        assert v.heartbeats > 5
    finally:
        beating.cancel()


async def test_an_older_server_without_the_stream_falls_back_to_validate(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake.watch_mode = "unimplemented"
    v = await make_validator(start=False)
    with pytest.raises(AuthServiceError) as caught:
        await v.start()
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert v.unsupported
    assert not v.fresh
    for _ in range(3):
        assert (await v.validate_async(fake.token())).subject == "from-remote"
    assert len(fake.validate_calls) == 3
    assert fake.watch_requests == [0]
    lines = [r for r in caplog.records if "does not serve WatchRevocations" in r.getMessage()]
    assert len(lines) == 1


async def test_a_token_of_a_key_not_heard_of_yet_is_asked_of_authsvc(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    newer = Signer.generate()
    token = fake.token(key=newer)
    assert v.validate(token).error == "BAD_SIGNATURE"  # sync: no I/O, the local answer
    assert (await v.validate_async(token)).subject == "from-remote"
    assert v.unknown_kid_fallbacks == 1
    # an implausible kid (not one authsvc makes) is refused locally
    odd = fake.keys[0].sign(fake.claims(), headers={"kid": "short"})
    assert (await v.validate_async(odd)).error == "BAD_SIGNATURE"
    assert len(fake.validate_calls) == 1


async def test_requests_authsvc_would_refuse_raise_invalid_argument(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    v = await make_validator()
    bad: list[tuple[str, tuple[str, ...], str | None, str]] = [
        ("", (), None, "access_token"),
        ("x" * (8 * 1024 + 1), (), None, "access_token"),
        ("é" * (4 * 1024 + 1), (), None, "access_token"),
        ("a\x00b", (), None, "access_token"),
        ("t", tuple(f"s{n}" for n in range(33)), None, "required_scopes"),
        ("t", ("has space",), None, "required_scopes[0]"),
        ("t", ("x" * 129,), None, "required_scopes[0]"),
        ("t", (), "a" * 257, "audience"),
    ]
    for token, scopes, audience, field in bad:
        with pytest.raises(AuthServiceError) as caught:
            v.validate(token, scopes, audience)
        with pytest.raises(AuthServiceError) as caught_async:
            await v.validate_async(token, scopes, audience)
        for error in (caught.value, caught_async.value):
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.fields == (field,)
            assert len(token) < 8 or token not in str(error)
    assert v.validate("x" * (8 * 1024)).error == "MALFORMED"  # at the limit: a verdict


async def test_revocations_are_forgotten_after_keep_until(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, wall: ManualClock, mono: ManualClock
) -> None:
    v = await make_validator()
    fake.revoke_session("short", keep_until=wall() + 10)
    fake.revoke_session("long", keep_until=wall() + 3600)
    await until(lambda: v.sequence == 2)
    wall.advance(11)
    mono.advance(31)  # the next update prunes (at most every 30 s)
    fake.revoke_user("zed", 1, keep_until=wall() + 5)
    await until(lambda: v.sequence == 3)
    assert not v.is_session_revoked("short")
    assert v.is_session_revoked("long")
    assert v.revoked_users == 1
    sessions, users = v.held()
    assert sessions == {"long": wall() - 11 + 3600}
    assert users == {"zed": (1, wall() + 5)}


async def test_an_update_before_any_snapshot_is_refused(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A server resuming a client that has nothing: the validator does not trust a delta
    as if it were everything, and asks again."""
    fake.revoke_session("x")
    original = fake._snapshot
    fake._snapshot = lambda: fake._delta(fake.log)  # type: ignore[method-assign]
    v = await make_validator(start=False)
    v.start_in_background()
    await until(lambda: len(fake.watch_requests) >= 2)
    assert not v.fresh
    assert any("before any snapshot" in r.getMessage() for r in caplog.records)
    fake._snapshot = original  # type: ignore[method-assign]
    await until(lambda: v.fresh)
    assert v.is_session_revoked("x")


def test_reconnect_backoff_is_exponential_jittered_and_capped() -> None:
    v = LocalValidator("127.0.0.1:1", initial_backoff=0.1, max_backoff=2.0, rng=random.Random(7))
    for attempt, step in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 2.0), (40, 2.0)):
        pauses = {v._backoff(attempt) for _ in range(50)}
        assert all(step / 2 <= p <= step for p in pauses)
        assert len(pauses) > 1  # jittered


async def test_metrics_are_plain_numbers_and_prometheus_only_if_installed(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = await make_validator()
    metrics = v.metrics()
    assert metrics["sequence"] == 0
    assert metrics["fresh"] == 1.0
    assert metrics["reconnects"] == 0
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert v.register_prometheus() is False
    monkeypatch.undo()
    prometheus = pytest.importorskip("prometheus_client")
    registry = prometheus.CollectorRegistry()
    assert v.register_prometheus(registry) is True
    fake.revoke_session("m")
    await until(lambda: v.sequence == 1)
    assert registry.get_sample_value("authsvc_local_validator_sequence") == 1
    assert registry.get_sample_value("authsvc_local_validator_updates_applied_total") == 2


def test_no_secret_in_repr(caplog: pytest.LogCaptureFixture) -> None:
    v = LocalValidator("127.0.0.1:1", service_token="service-token-secret-0123456789")
    assert "service-token-secret" not in repr(v)
    logging.getLogger("authsvc_client").info("%r", v)
