"""FailureThrottle (shared.ratelimit): delays after free failures, capped; blocking; bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.ratelimit import FailureThrottle

T0 = 1000.0


def fail(throttle: FailureThrottle, key: str, times: int, now: float = T0) -> None:
    for _ in range(times):
        throttle.failure(key, now)


def test_no_delay_for_unknown_source():
    throttle = FailureThrottle()
    assert throttle.delay("10.0.0.1", T0) == 0.0
    assert not throttle.blocked("10.0.0.1", T0)
    assert len(throttle) == 0


def test_free_failures_cost_nothing_then_delay_doubles_up_to_the_cap():
    throttle = FailureThrottle(free_failures=3, base_delay=0.5, max_delay=4.0)
    delays = []
    for count in range(1, 10):
        assert throttle.failure("a", T0) == count
        delays.append(throttle.delay("a", T0))
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:6] == [0.5, 1.0, 2.0, 4.0]
    assert delays[6:] == [4.0, 4.0, 4.0]


def test_huge_failure_count_stays_capped():
    throttle = FailureThrottle(free_failures=0, base_delay=1.0, max_delay=7.0)
    fail(throttle, "a", 5000)
    assert throttle.delay("a", T0) == 7.0


def test_sources_are_independent():
    throttle = FailureThrottle(free_failures=1)
    fail(throttle, "attacker", 10)
    assert throttle.delay("attacker", T0) > 0
    assert throttle.delay("office", T0) == 0.0


def test_success_resets():
    throttle = FailureThrottle(free_failures=1, block_after=3)
    fail(throttle, "a", 5)
    assert throttle.delay("a", T0) > 0 and throttle.blocked("a", T0)
    throttle.success("a")
    assert throttle.delay("a", T0) == 0.0
    assert not throttle.blocked("a", T0)
    assert throttle.failure("a", T0) == 1  # counting starts again
    throttle.success("never-seen")  # harmless


def test_failures_are_forgotten_after_quiet_time():
    throttle = FailureThrottle(free_failures=1, forget_after=60.0)
    fail(throttle, "a", 4)
    assert throttle.delay("a", T0 + 59) > 0
    assert throttle.delay("a", T0 + 61) == 0.0
    assert throttle.failure("a", T0 + 62) == 1


def test_a_new_failure_restarts_the_quiet_time():
    throttle = FailureThrottle(free_failures=1, forget_after=60.0)
    fail(throttle, "a", 3, T0)
    fail(throttle, "a", 1, T0 + 50)
    assert throttle.delay("a", T0 + 100) > 0  # 50 s after the last failure, not 100


def test_no_blocking_unless_configured():
    throttle = FailureThrottle()
    fail(throttle, "a", 1000)
    assert not throttle.blocked("a", T0)


def test_block_then_unblock_over_time():
    throttle = FailureThrottle(block_after=5, block_for=30.0, forget_after=600.0)
    fail(throttle, "a", 4)
    assert not throttle.blocked("a", T0)
    fail(throttle, "a", 1)
    assert throttle.blocked("a", T0)
    assert throttle.blocked("a", T0 + 29.9)
    assert not throttle.blocked("a", T0 + 30.1)
    assert not throttle.blocked("b", T0)


def test_failing_while_blocked_extends_the_block():
    throttle = FailureThrottle(block_after=2, block_for=30.0)
    fail(throttle, "a", 2, T0)
    fail(throttle, "a", 1, T0 + 20)
    assert throttle.blocked("a", T0 + 40)
    assert not throttle.blocked("a", T0 + 51)


def test_table_is_bounded_and_forgets_the_oldest():
    throttle = FailureThrottle(free_failures=0, max_entries=100)
    for n in range(1000):
        throttle.failure(f"10.0.{n // 256}.{n % 256}", T0 + n)
    assert len(throttle) == 100
    assert throttle.delay("10.0.0.0", T0 + 1000) == 0.0  # oldest: forgotten
    assert throttle.delay("10.0.3.231", T0 + 1000) > 0  # newest: kept


def test_recent_failure_keeps_an_old_source_in_the_table():
    throttle = FailureThrottle(free_failures=0, max_entries=3)
    throttle.failure("a", T0)
    throttle.failure("b", T0 + 1)
    throttle.failure("c", T0 + 2)
    throttle.failure("a", T0 + 3)  # a is the most recent now
    throttle.failure("d", T0 + 4)  # evicts b, the least recent
    assert throttle.delay("a", T0 + 5) > 0
    assert throttle.delay("b", T0 + 5) == 0.0


@given(
    free=st.integers(0, 10),
    base=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 100.0),
    events=st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60),
)
def test_delay_never_negative_never_over_cap_and_monotone(free, base, cap, events):
    throttle = FailureThrottle(free_failures=free, base_delay=base, max_delay=cap, max_entries=3)
    previous: dict[str, float] = {}
    now = T0
    for key, failed in events:
        now += 0.01
        if failed:
            throttle.failure(key, now)
        else:
            throttle.success(key)
            previous.pop(key, None)
        delay = throttle.delay(key, now)
        assert 0.0 <= delay <= cap
        if failed and key in previous:
            assert delay >= previous[key]
        previous[key] = delay
        assert len(throttle) <= 3


def test_a_block_longer_than_the_memory_still_lasts():
    throttle = FailureThrottle(block_after=2, block_for=900.0, forget_after=60.0)
    fail(throttle, "a", 2)
    assert throttle.blocked("a", T0 + 700)  # not forgotten at 60 s while still blocked
    assert not throttle.blocked("a", T0 + 901)
    assert throttle.delay("a", T0 + 902) == 0.0
