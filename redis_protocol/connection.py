"""The Redis client, and what counts as Redis being unavailable.

The client never resends a command by itself. A command whose reply is lost (the connection dropped
after Redis ran it) may or may not have run, so resending it blindly could run it twice: a second
BLMOVE would strand a job, a second LPUSH would queue a duplicate. Each operation in queue.py decides:
idempotent ones go through `retry_once`; the others recover in their own way (see the package docs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Redis cannot be reached, or refuses writes for now (maxmemory reached; a replica after a failover).
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
# Errors after which a command's outcome is unknown: it may have run, and only its reply was lost.
REPLY_LOST: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

T = TypeVar("T")


def connect(url: str) -> redis.Redis:
    """A client that fails fast when Redis is down (1 s connect timeout) and never resends a command."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def retry_once(action: Callable[[], T]) -> T:
    """Run an idempotent `action`; once more, on a fresh connection, if its reply was lost.

    Only for actions that leave the same state whether they run once or twice.
    """
    try:
        return action()
    except REPLY_LOST:
        return action()
