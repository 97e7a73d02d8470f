"""The restart policy shared by chorus up and the combiner's supervisor."""

from __future__ import annotations

from combiner.workers import Restarts


def test_a_process_is_restarted_at_once_then_ever_later_until_a_crash_loop():
    restarts = Restarts(limit=5, window_s=60.0, first_delay_s=0.1, max_delay_s=1.0)
    delays = [restarts.next_delay(now=float(t)) for t in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert restarts.next_delay(now=5.0) is None  # a sixth death within the minute: give up
    assert "5 restarts within 60 s" in restarts.describe()


def test_deaths_far_apart_never_make_a_crash_loop():
    restarts = Restarts(limit=5, window_s=60.0, first_delay_s=0.1)
    assert all(restarts.next_delay(now=t * 61.0) == 0.1 for t in range(20))
