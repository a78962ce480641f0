"""The token bucket, by calling it with a clock we control."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime.core.ratelimit import RateLimiter, Verdict


def test_burst_then_rate() -> None:
    limiter = RateLimiter(10, 5, 100, now=0.0)
    assert [limiter.check(0.0) for _ in range(6)] == [Verdict.ALLOW] * 5 + [Verdict.LIMITED]
    assert limiter.check(0.05) is Verdict.LIMITED  # half a token
    assert limiter.check(0.15) is Verdict.ALLOW  # a full one refilled
    assert limiter.check(0.15) is Verdict.LIMITED
    assert [limiter.check(10.0) for _ in range(6)].count(Verdict.ALLOW) == 5  # capped at burst


def test_steady_sending_at_the_rate_is_never_refused() -> None:
    limiter = RateLimiter(20, 1, 0, now=0.0)
    assert all(limiter.check(i / 20) is Verdict.ALLOW for i in range(1000))


def test_a_flood_becomes_abuse_a_little_over_does_not() -> None:
    flood = RateLimiter(10, 10, 20, now=0.0)
    verdicts = [flood.check(i / 1000) for i in range(200)]  # 1000/s against 10/s
    assert verdicts[:10] == [Verdict.ALLOW] * 10
    assert Verdict.ABUSE in verdicts
    first_abuse = verdicts.index(Verdict.ABUSE)
    assert 30 <= first_abuse <= 40  # 10 allowed, then 20 refused (minus a little drain)

    slightly = RateLimiter(10, 10, 20, now=0.0)
    # 15/s against 10/s for a minute: refused now and then, never abuse.
    verdicts = [slightly.check(i / 15) for i in range(900)]
    assert Verdict.LIMITED in verdicts
    assert Verdict.ABUSE not in verdicts


def test_a_clock_going_backwards_changes_nothing() -> None:
    limiter = RateLimiter(1, 1, 0, now=100.0)
    assert limiter.check(100.0) is Verdict.ALLOW
    assert limiter.check(50.0) is Verdict.ABUSE  # max_refused 0: the first refusal closes


@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 1000),
    times=st.lists(st.floats(0, 1000), max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, times: list[float]
) -> None:
    times.sort()
    limiter = RateLimiter(rate, burst, 10**9, now=0.0)
    allowed = sum(limiter.check(t) is Verdict.ALLOW for t in times)
    elapsed = times[-1] if times else 0.0
    assert allowed <= burst + rate * elapsed + 1e-6


@pytest.mark.parametrize(("rate", "burst", "refused"), [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_bad_arguments(rate: float, burst: int, refused: int) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        RateLimiter(rate, burst, refused, now=0.0)
