"""Issue 10, "Must show — Freshness": from the moment Revoke returns on one replica, a
LocalValidator following another replica refuses the token within 100 ms at p99 (over
200 revocations), and within 1 s at worst while that replica's LISTEN connection is being
cut. Two real `authsvc serve` processes on one database (`service.loadtest.freshness`,
the same code as `authsvc bench`'s rows).

The 100 ms is the issue's requirement, asserted as measured (one run, no retries): the
delay is a wake-up, a read of the log and one stream message, a few milliseconds on an
idle machine, so a loaded machine has a wide margin before it.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from service.loadtest.freshness import (
    CUT_LISTENERS_SQL,
    CUT_TARGET_MS,
    LISTENERS_SQL,
    STEADY_TARGET_MS,
    Delays,
    FreshnessOptions,
    FreshnessResult,
    run_freshness,
)
from service.store.revocation_feed import LISTENER_APPLICATION_NAME


@pytest.mark.system
@pytest.mark.timeout(300)
def test_a_revocation_on_one_replica_is_refused_by_a_validator_on_another_within_bounds(
    database_url: str, report_figure: Callable[[str], None]
) -> None:
    options = FreshnessOptions(revocations=200, cut_seconds=5.0, cut_sessions=150)
    result = run_freshness(options, {"AUTH_DATABASE_URL": database_url})
    steady, cut = result.steady, result.cut
    report_figure(
        f"freshness: steady p50 {steady.ms(50):.1f} ms, p99 {steady.ms(99):.1f} ms, "
        f"max {steady.max_ms:.1f} ms over {steady.count}; listener cut {result.listener_cuts} "
        f"times: p99 {cut.ms(99):.1f} ms, max {cut.max_ms:.1f} ms over {cut.count} "
        f"({result.near_cut} within 300 ms after a cut)"
    )
    assert steady.count == 200 and steady.not_refused == 0
    assert steady.ms(99) <= STEADY_TARGET_MS, result.table()
    # The cut phase really cut B's listener, and revocations landed while it reconnected.
    assert result.listener_cuts >= 5, result.table()
    assert result.near_cut >= 5, result.table()
    assert cut.count >= 20 and cut.not_refused == 0, result.table()
    assert cut.max_ms <= CUT_TARGET_MS, result.table()
    assert result.passed


def test_the_verdict_needs_200_revocations_and_both_bounds() -> None:
    fast = Delays([0.001] * 199 + [0.09])
    ok = FreshnessResult(FreshnessOptions(), steady=fast, cut=Delays([0.001, 0.9]))
    assert ok.passed
    assert "| 200 | 1.0 | 1.0 | 90.0 |" in ok.table()
    too_few = FreshnessResult(FreshnessOptions(), steady=Delays([0.001] * 199), cut=ok.cut)
    assert not too_few.passed
    slow_p99 = Delays([0.001] * 197 + [0.2] * 3)
    assert not FreshnessResult(FreshnessOptions(), steady=slow_p99, cut=ok.cut).passed
    slow_cut = FreshnessResult(FreshnessOptions(), steady=fast, cut=Delays([0.001, 1.2]))
    assert not slow_cut.passed
    lost = FreshnessResult(FreshnessOptions(), steady=fast, cut=Delays([0.1], not_refused=1))
    assert not lost.passed
    assert FreshnessResult(FreshnessOptions(cut_seconds=0), steady=fast).passed


async def test_listener_cuts_end_only_the_listeners_of_the_measured_database(
    database_url: str, empty_database: str
) -> None:
    """`make freshness` and `authsvc bench` may be pointed at a PostgreSQL that other
    databases share (AUTH_DATABASE_URL): the listeners of another database's authsvc are
    neither counted nor cut."""
    other = await asyncpg.connect(
        empty_database, server_settings={"application_name": LISTENER_APPLICATION_NAME}
    )
    ours = await asyncpg.connect(
        database_url, server_settings={"application_name": LISTENER_APPLICATION_NAME}
    )
    cutter = await asyncpg.connect(database_url)
    try:
        other_pid, ours_pid = other.get_server_pid(), ours.get_server_pid()
        listed = {r["pid"] for r in await cutter.fetch(LISTENERS_SQL, LISTENER_APPLICATION_NAME)}
        assert listed == {ours_pid}
        assert await cutter.fetchval(CUT_LISTENERS_SQL, LISTENER_APPLICATION_NAME, []) == 1
        assert await other.fetchval("SELECT 1") == 1  # still connected
        alive = await cutter.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", other_pid
        )
        assert alive == 1
    finally:
        await cutter.close()
        await other.close()
        ours.terminate()
