"""Waiting between attempts while Redis is unavailable: one Backoff, and `retry` for loops that only retry.

backoff = Backoff(0.1, 5.0)           # 0.1, 0.2, 0.4 ... 5.0, 5.0 ...
delay = backoff.next()                # after a failure
backoff.reset()                       # after a success

retry(action, REDIS_UNAVAILABLE, Backoff(0.1, 5.0), on_error=warn, give_up_after=10)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Delays from `initial`, each `factor` times the last, up to `maximum` (factor 1: a constant delay)."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self.delay = initial

    def next(self) -> float:
        """The delay to wait now; the one after it grows."""
        delay = self.delay
        self.delay = min(delay * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from `initial` (after a success)."""
        self.delay = self.initial


def retry(
    action: Callable[[], T],
    errors: tuple[type[Exception], ...],
    backoff: Backoff,
    on_error: Callable[[Exception, float], None] | None = None,
    give_up_after: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """`action()`, run again after each of `errors` once the backoff's delay has passed (`on_error(exc, delay)`
    is told first). Re-raises the last error once `give_up_after` seconds have passed since the first
    attempt, or when `should_stop()` says so."""
    started = time.monotonic()
    while True:
        try:
            return action()
        except errors as exc:
            if give_up_after is not None and time.monotonic() - started > give_up_after:
                raise
            if should_stop is not None and should_stop():
                raise
            delay = backoff.next()
            if on_error is not None:
                on_error(exc, delay)
            time.sleep(delay)
