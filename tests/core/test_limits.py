"""The pure parts of the control socket's limits: the log rate limiter, the accept back-off,
the `Limits` values, and the request deadline (`agent.core.deadline`)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.deadline import CURRENT, Deadline
from agent.frontends.jsonrpc.limits import (
    MAX_CONNECTIONS_CAP,
    MIN_CONNECTIONS,
    Limits,
    LogLimiter,
    accept_backoff,
    default_max_connections,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 2.0), st.sampled_from(["a", "b", "c"])), max_size=400),
    st.floats(0.1, 10),
    st.integers(1, 10),
)
def test_log_limiter_bounds_lines_and_counts_every_dropped_one(
    steps: list[tuple[float, str]], rate: float, burst: int
) -> None:
    limiter = LogLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed: dict[str, int] = {}
    dropped: dict[str, int] = {}
    reported: dict[str, int] = {}
    for gap, key in steps:
        now += gap
        verdict = limiter.allow(key, now)
        if verdict is None:
            dropped[key] = dropped.get(key, 0) + 1
        else:
            allowed[key] = allowed.get(key, 0) + 1
            reported[key] = reported.get(key, 0) + verdict
    for count in allowed.values():
        assert count <= burst + rate * now + 1  # a token bucket's bound
    for key in dropped:  # every dropped line is reported by a later one, or still pending
        assert reported.get(key, 0) <= dropped[key]


def test_log_limiter_reports_what_it_dropped_and_refills() -> None:
    limiter = LogLimiter(rate=1.0, burst=2)
    assert [limiter.allow("k", 0.0) for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.allow("other", 0.0) == 0  # keys are independent
    assert limiter.allow("k", 1.0) == 3  # one token back: says how many were dropped
    assert limiter.allow("k", 1.0) is None


def test_log_limiter_keeps_a_bounded_number_of_keys() -> None:
    limiter = LogLimiter(rate=1.0, burst=1, keys=10)
    for uid in range(1000):
        limiter.allow(uid, 0.0)
    assert len(limiter._buckets) == 10


def test_accept_backoff_doubles_between_10ms_and_1s() -> None:
    pauses = [accept_backoff(0.0)]
    for _ in range(10):
        pauses.append(accept_backoff(pauses[-1]))
    assert pauses[0] == 0.01 and pauses[-1] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(pauses))


def test_limits_validate_and_default_under_the_descriptor_limit() -> None:
    for bad in ({"max_connections": 0}, {"idle_timeout": 0}, {"request_timeout": -1}):
        with pytest.raises(ValueError):
            Limits(**bad)
    assert Limits(max_connections=7).connections == 7
    assert Limits(request_timeout=None).request_timeout is None  # --request-timeout 0: off
    assert MIN_CONNECTIONS <= Limits().connections == default_max_connections()
    assert default_max_connections() <= MAX_CONNECTIONS_CAP


def test_deadline_binds_only_the_first_job() -> None:
    d = Deadline(12.5, 1.0)
    assert CURRENT.get() is None
    token = CURRENT.set(d)
    try:
        assert CURRENT.get() is d
        assert d.take() == 12.5
        assert d.take() is None  # later jobs (rollbacks included) are unbounded
    finally:
        CURRENT.reset(token)
