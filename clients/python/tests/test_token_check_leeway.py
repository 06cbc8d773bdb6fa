"""The leeway a TokenChecker (and so a LocalValidator) accepts: no more than authsvc's
largest AUTH_LEEWAY. authsvc remembers a revocation for that long past its session's last
`exp` (the stream's `keep_until`) and the checker forgets it then; a larger leeway would
accept a revoked session's token again after its revocation was forgotten."""

from __future__ import annotations

import pytest
from authsvc_client.token_check import MAX_LEEWAY_SECONDS, TokenChecker


def _checker(leeway: float) -> TokenChecker:
    return TokenChecker(issuer="authsvc", leeway=leeway, clock=lambda: 0.0, cache_size=0)


@pytest.mark.parametrize("leeway", [MAX_LEEWAY_SECONDS + 1, 3600, float("inf"), -1, float("nan")])
def test_a_leeway_that_could_outlive_a_remembered_revocation_is_refused(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        _checker(leeway)


@pytest.mark.parametrize("leeway", [0, 30, MAX_LEEWAY_SECONDS])
def test_leeways_authsvc_accepts_are_accepted(leeway: float) -> None:
    _checker(leeway)


def test_the_bound_is_authsvcs() -> None:
    assert MAX_LEEWAY_SECONDS == 300  # service/settings.py MAX_LEEWAY
