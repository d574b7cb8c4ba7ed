"""The circuit breaker per instance: out of rotation after failures in a row, back after a good probe."""
import pytest

from router.breaker import CircuitBreakers


def test_failures_in_a_row_open_it_and_a_success_between_resets_the_count():
    b = CircuitBreakers(failures=3, cooldown_s=10.0)
    b.failure("d0", 0.0)
    b.failure("d0", 1.0)
    b.success("d0")                      # a good request in between: the count starts over
    b.failure("d0", 2.0)
    b.failure("d0", 3.0)
    assert b.available("d0", 3.0) and not b.is_open("d0")
    b.failure("d0", 4.0)
    assert not b.available("d0", 4.0) and b.is_open("d0")
    assert b.available("d1", 4.0)        # the others are untouched


def test_after_the_cooldown_one_probe_goes_and_its_outcome_decides():
    b = CircuitBreakers(failures=1, cooldown_s=5.0)
    b.failure("p0", 0.0)
    assert not b.available("p0", 4.9)
    assert b.available("p0", 5.0)        # half-open
    b.dispatched("p0", 5.0)              # the probe is out: nothing else until it answers
    assert not b.available("p0", 5.1)
    b.failure("p0", 6.0)                 # the probe failed: open for another cooldown
    assert not b.available("p0", 10.9) and b.available("p0", 11.0)
    b.dispatched("p0", 11.0)
    b.success("p0")                      # the probe came back well: closed
    assert b.available("p0", 11.0) and not b.is_open("p0")


def test_work_sent_to_a_closed_breaker_is_not_a_probe_and_forget_clears_it():
    b = CircuitBreakers(failures=2, cooldown_s=1.0)
    b.dispatched("x", 0.0)
    assert b.available("x", 0.0)
    b.failure("x", 0.0)
    b.failure("x", 0.0)
    b.forget("x")                        # the instance is gone
    assert b.available("x", 0.0)


@pytest.mark.parametrize("failures, cooldown", [(0, 1.0), (1, -1.0)])
def test_bad_settings_are_refused(failures, cooldown):
    with pytest.raises(ValueError):
        CircuitBreakers(failures, cooldown)
