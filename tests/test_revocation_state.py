"""RevocationState's journal (unit): entries applied in log order, what a watcher resuming
from a position gets, the horizon below which it gets a snapshot, pruning, a rewound log."""

from __future__ import annotations

from service.domain.revocation import (
    REMEMBER_PAST_BOUND_SECONDS,
    KeysChanged,
    LogEntry,
    Revocation,
    RevocationState,
    UserRevocation,
)


def _session(sequence: int, bound: float = 2000.0) -> LogEntry:
    return LogEntry(sequence, Revocation(f"s{sequence}", 1000.0, bound))


def test_entries_are_applied_once_in_order_and_told_to_listeners() -> None:
    state = RevocationState()
    told: list[tuple[list[int], bool]] = []
    state.subscribe(lambda entries, rewound: told.append(([e.sequence for e in entries], rewound)))
    state.reset([_session(1)], sequence=1, horizon=0)
    assert state.apply([_session(1), _session(2), _session(3)]) == [_session(2), _session(3)]
    assert state.apply([_session(2)]) == []  # known already: nothing told
    assert told == [([1], False), ([2, 3], False)]
    assert state.sequence == 3 and state.is_revoked("s3")


def test_a_resume_gets_what_came_after_within_the_journal_and_none_outside_it() -> None:
    state = RevocationState()
    state.reset([_session(5), _session(6)], sequence=6, horizon=4)
    state.apply([LogEntry(7, UserRevocation("u", 2, 1000.0, 2000.0)), _session(8)])
    assert [e.sequence for e in state.entries_after(4) or []] == [5, 6, 7, 8]
    assert [e.sequence for e in state.entries_after(6) or []] == [7, 8]
    assert state.entries_after(8) == []
    assert state.entries_after(3) is None  # below the horizon: compacted
    assert state.entries_after(9) is None  # ahead of this state
    # More than a watcher may be sent as a resume: None, before anything is copied.
    assert state.entries_after(4, at_most=3) is None
    assert [e.sequence for e in state.entries_after(5, at_most=3) or []] == [6, 7, 8]
    assert state.is_revoked_for_user("u", 1)


def test_pruning_forgets_expired_entries_and_raises_the_horizon() -> None:
    state = RevocationState()
    keys = LogEntry(2, KeysChanged(1000.0, 1200.0))
    state.reset([_session(1, bound=1000.0), keys, _session(3, bound=5000.0)], sequence=3, horizon=0)
    forgotten = state.forgotten
    state.prune(1000.0 + REMEMBER_PAST_BOUND_SECONDS + 1)
    assert state.horizon == 2
    assert state.entries_after(1) is None
    assert [e.sequence for e in state.entries_after(2) or []] == [3]
    assert not state.is_revoked("s1") and state.is_revoked("s3")
    assert state.forgotten == forgotten + 1


def test_a_rewound_log_is_followed_and_told_as_such() -> None:
    state = RevocationState()
    told: list[bool] = []
    state.subscribe(lambda _entries, rewound: told.append(rewound))
    state.reset([_session(9)], sequence=9, horizon=0)
    state.reset([_session(3)], sequence=3, horizon=0)  # a database restored from a backup
    assert told == [False, True]
    assert state.sequence == 3
    assert state.entries_after(2) is None  # nothing older is owed to anyone
    assert state.is_revoked("s9")  # revocations are never undone
