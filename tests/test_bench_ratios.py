"""The bench's ratios (`service.loadtest.bench`): the composite limit, and the spread of a
ratio over the rounds, each round's row paired with that round's own baseline."""

from __future__ import annotations

import pytest

from service.loadtest.bench import BenchOptions, composite_limit, per_process, round_ratios


def test_the_composite_limit_adds_the_two_costs_per_call() -> None:
    # 1 ms an empty call plus 0.25 ms a bare rotation: 1.25 ms, 800 calls a second.
    assert composite_limit(1000.0, 4000.0) == pytest.approx(800.0)
    assert composite_limit(0.0, 4000.0) == 0.0


def test_each_round_is_read_against_its_own_baseline() -> None:
    # Round 1: 100 of 100 (1.0); round 2: 200 of 400 (0.5); round 3: 150 of 200 (0.75).
    # Unpaired (lowest rate over highest baseline, ...) it would read 0.25-2.0.
    assert round_ratios([100.0, 200.0, 150.0], [100.0, 400.0, 200.0]) == (0.5, 1.0)


def test_one_round_has_no_spread_and_a_baseline_of_zero_is_left_out() -> None:
    assert round_ratios([100.0], [100.0]) is None
    assert round_ratios([100.0, 50.0], [0.0, 100.0]) is None
    assert round_ratios([100.0, 50.0, 90.0], [0.0, 100.0, 100.0]) == (0.5, 0.9)


def test_the_bench_runs_issue_12s_load_by_default() -> None:
    # "2 load processes x 32 concurrent calls": 32 in each, 64 in flight in all.
    options = BenchOptions()
    assert (options.processes, options.concurrency) == (2, 64)
    assert per_process(options) == "32"
    assert per_process(BenchOptions(processes=2, concurrency=5)) == "2-3"
