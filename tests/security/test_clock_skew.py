"""A replica whose host clock is off must not weaken what the others enforce."""

from __future__ import annotations

from authsvc_client.gen.auth.v1 import auth_pb2

from tests.helpers import validate
from tests.test_clock import Replicas, eventually, replicas

__all__ = ["replicas"]  # the fixture, shared with tests/test_clock.py


async def test_a_revocation_through_a_slow_replica_is_remembered_as_long_as_on_the_others(
    replicas: Replicas,
) -> None:
    """A Revoke through a replica whose host clock is 90 s slow: the other replicas keep
    refusing the session's access tokens until those expire. (On host clocks, the revocation
    was stamped 90 s early, and the others forgot it while its tokens were still alive.)"""
    slow = await replicas.start(skew=-90.0, clock_skew_max=0.0)  # 0: not refused for it
    correct = await replicas.start(skew=0.0, revocation_poll_interval=0.1)
    user = await correct.create_user()
    pair = await correct.login(user.username)
    revoked = await slow.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token))
    assert revoked.revoked_sessions == 1
    revocations = correct.running.components.revocations
    await eventually(lambda: len(revocations) == 1)

    # 20 s before the access token expires; the correct replica's poll prunes its state.
    replicas.timeline.advance(correct.settings.access_ttl - 20)
    feed = correct.running.revocation_feed
    polls_before = feed.polls
    await eventually(lambda: feed.polls >= polls_before + 2)

    answer = await validate(correct, pair.access_token)
    assert not answer.valid
    assert answer.error == auth_pb2.VALIDATION_ERROR_REVOKED
