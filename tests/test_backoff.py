"""The backoff helper that the retry loops share (protocol/backoff.py): its delays, and when `retry` stops."""

from __future__ import annotations

import pytest
import redis

from imgserve.protocol.backoff import Backoff, retry

pytestmark = pytest.mark.unit


def test_delays_double_up_to_the_maximum_and_start_again_after_reset():
    backoff = Backoff(0.1, 5.0)
    assert [round(backoff.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.1


def test_factor_one_is_a_constant_delay():
    backoff = Backoff(0.2, 0.2, factor=1)
    assert [backoff.next() for _ in range(3)] == [0.2, 0.2, 0.2]


def failing(times: int, error: type[Exception] = redis.ConnectionError):
    """An action that raises `error` `times` times, then answers "done"; `.calls` counts the attempts."""

    def action():
        action.calls += 1
        if action.calls <= times:
            raise error("Connection refused")
        return "done"

    action.calls = 0
    return action


def test_retry_runs_the_action_again_after_each_error_and_tells_on_error_the_delay():
    action, told = failing(3), []
    result = retry(action, (redis.ConnectionError,), Backoff(0.0, 0.0), on_error=lambda exc, delay: told.append(delay))
    assert result == "done" and action.calls == 4 and told == [0.0, 0.0, 0.0]


def test_retry_reraises_when_told_to_stop_or_past_give_up_after():
    action = failing(10)
    with pytest.raises(redis.ConnectionError):
        retry(action, (redis.ConnectionError,), Backoff(0.0, 0.0), should_stop=lambda: action.calls >= 2)
    assert action.calls == 2
    action = failing(1000)
    with pytest.raises(redis.ConnectionError):
        retry(action, (redis.ConnectionError,), Backoff(0.01, 0.01), give_up_after=0.05)
    assert 1 < action.calls < 1000


def test_retry_lets_other_errors_through_at_once():
    action = failing(1, redis.ResponseError)
    with pytest.raises(redis.ResponseError):
        retry(action, (redis.ConnectionError,), Backoff(0.0, 0.0))
    assert action.calls == 1
