"""The adaptive admission bound (``services/gateway/admission.py``) on a scripted clock:
it falls while the admitted calls are slower than the target (or their downstream calls
run out of time), rises again only while the load reaches it, and stays in its range."""

from __future__ import annotations

import pytest

from services.gateway.admission import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _window(lim: AdaptiveLimit, clock: Clock, latencies: list[float], busy: bool) -> None:
    """One decision window: calls admitted up to the bound (``busy``) or one at a
    time, ending with ``latencies``; the last one ends the window (the decision is
    taken at the first call that ends after ``window_s``)."""
    lim.admit(lim.limit - 1 if busy else 0)
    for latency in latencies[:-1]:
        lim.done(latency)
    clock.now += lim.window_s
    lim.done(latencies[-1])


def test_the_bound_falls_under_slow_calls_and_recovers() -> None:
    clock = Clock()
    lim = AdaptiveLimit(64, target_s=0.1, min_limit=4, initial=16, clock=clock)
    assert lim.limit == 16
    _window(lim, clock, [0.3] * 10, busy=True)  # every call past the target
    assert lim.limit == 12  # 16 x 0.8
    for _ in range(20):
        _window(lim, clock, [0.3] * 10, busy=True)
    assert lim.limit == 4  # never below the floor
    # fast again, and the load reaches the bound: one more per window
    _window(lim, clock, [0.01] * 10, busy=True)
    _window(lim, clock, [0.01] * 10, busy=True)
    assert lim.limit == 6
    for _ in range(100):
        _window(lim, clock, [0.01] * 10, busy=True)
    assert lim.limit == 64  # never above MAX_IN_FLIGHT


def test_a_light_load_does_not_raise_the_bound_and_one_slow_call_does_not_cut_it() -> None:
    clock = Clock()
    lim = AdaptiveLimit(64, target_s=0.1, initial=16, clock=clock)
    for _ in range(10):  # fast, but never near the bound: nothing learnt
        _window(lim, clock, [0.01] * 10, busy=False)
    assert lim.limit == 16
    # one slow call in twenty is within the share allowed (the window's p90 is fast)
    _window(lim, clock, [0.01] * 19 + [0.5], busy=False)
    assert lim.limit == 16
    # too few calls in a window: no decision yet
    _window(lim, clock, [0.5] * 3, busy=True)
    assert lim.limit == 16


def test_downstream_timeouts_cut_the_bound_like_slow_calls() -> None:
    clock = Clock()
    lim = AdaptiveLimit(64, target_s=0.1, initial=20, clock=clock)
    lim.admit(19)
    for _ in range(3):
        lim.timed_out()  # the hops ran out of time; the calls themselves answered fast
    for _ in range(6):
        lim.done(0.01)
    clock.now += lim.window_s
    lim.done(0.01)
    assert lim.limit == 16


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="min_limit"):
        AdaptiveLimit(4, target_s=0.1, min_limit=8)


def _ticks(lim: AdaptiveLimit, clock: Clock, lags: list[float]) -> None:
    """One window of the loop-lag ticker: ``lags`` spread over ``window_s`` (a binary
    fraction in these tests, so the steps add up to it exactly)."""
    for lag in lags:
        clock.now += lim.window_s / len(lags)
        lim.lag(lag)


def test_a_lagging_event_loop_cuts_the_bound_though_the_admitted_calls_are_fast() -> None:
    clock = Clock()
    lim = AdaptiveLimit(
        64, target_s=0.1, initial=20, lag_target_s=0.02, window_s=1 / 16, clock=clock
    )
    # the calls that got in are fast, but the loop wakes the ticker 50 ms late in 2 of
    # 16 ticks: calls are queueing in front of the handler
    lim.admit(19)
    for _ in range(6):
        lim.done(0.01)
    _ticks(lim, clock, [0.001] * 14 + [0.05] * 2)
    assert lim.limit == 16
    # no call ended at all (the loop is that far behind): the lag alone decides
    lim.admit(15)
    _ticks(lim, clock, [0.2] * 4)
    assert lim.limit == 12


def test_idle_ticks_and_a_slow_loop_with_few_calls_in_progress_do_not_cut_the_bound() -> None:
    clock = Clock()
    lim = AdaptiveLimit(
        64, target_s=0.1, initial=20, lag_target_s=0.02, window_s=1 / 16, clock=clock
    )
    for _ in range(100):  # idle: the ticker runs, no calls, a late tick in 16 allowed
        _ticks(lim, clock, [0.001] * 15 + [0.05])
    assert lim.limit == 20
    # a slow loop with few calls in progress (other processes' load) does not cut it
    lim.admit(3)
    _ticks(lim, clock, [0.05] * 16)
    assert lim.limit == 20
    # a backlog after the idle time is seen within one window
    lim.admit(9)
    _ticks(lim, clock, [0.001] * 14 + [0.05] * 2)
    assert lim.limit == 16
    # without a lag target the ticks are ignored
    off = AdaptiveLimit(64, target_s=0.1, initial=20, window_s=1 / 16, clock=clock)
    _ticks(off, clock, [0.5] * 16)
    assert off.limit == 20
