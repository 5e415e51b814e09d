"""The Redis client, and what counts as Redis being unavailable.

The client never resends a command by itself. A command whose reply is lost (the connection dropped
after Redis ran it) may or may not have run, so resending it blindly could run it twice: a second
BLMOVE would strand a job, a second LPUSH would queue a duplicate. Each operation in queue.py decides:
idempotent ones go through `retry_once`; the others recover in their own way (see the package docs).

REDIS_URL may point at a plain Redis or at any node of a Redis Cluster: `connect` asks the server
(`cluster_enabled:1` in INFO) and returns a RedisCluster client for a cluster. That client follows
MOVED and ASK redirections (the command did not run where it was refused, so sending it to the right
node is no resend) and refreshes its map of the slots after a lost connection, but never resends a
command whose reply was lost either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from imgserve import logger

from .backoff import Backoff, retry

log = logger.get(__name__)

# Redis cannot be reached, or refuses writes for now (maxmemory reached; a replica after a failover; a
# cluster that lost the primary of the slot, or whose slot is being moved). ClusterError is redis-py giving
# up after redirections and TRYAGAIN replies (a slot in the middle of a move): the command did not run.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ClusterError,
)
# Errors after which a command's outcome is unknown: it may have run, and only its reply was lost.
REPLY_LOST: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

# How long start-up waits for Redis to say whether it is a cluster before assuming it is not.
DETECT_TIMEOUT = 5.0

Client = redis.Redis | RedisCluster
T = TypeVar("T")

_OPTIONS = dict(
    socket_connect_timeout=1.0,  # fail fast when Redis is down
    socket_timeout=5.0,
    health_check_interval=15,
    retry=Retry(NoBackoff(), 0),  # never resend
    decode_responses=False,
)


def connect(url: str) -> Client:
    """A client that fails fast when Redis is down and never resends a command: a RedisCluster client
    when the server at `url` is a cluster node, else a plain one."""
    if not is_cluster(url):
        return redis.Redis.from_url(url, **_OPTIONS)
    # require_full_coverage=False: while one primary is down, the shards on the others keep working.
    return RedisCluster.from_url(url, require_full_coverage=False, **_OPTIONS)


def is_cluster(url: str, timeout: float = DETECT_TIMEOUT) -> bool:
    """True when the server at `url` runs in cluster mode; False, with a warning, if it cannot be asked."""
    with redis.Redis.from_url(url, **_OPTIONS) as probe:
        try:
            info = retry(lambda: probe.info("cluster"), REPLY_LOST, Backoff(0.2, 0.2), give_up_after=timeout)
        except redis.ResponseError as exc:  # INFO denied (an ACL): a cluster would have to allow it
            log.warning("Redis refused INFO (%s); assuming a plain Redis", exc)
            return False
        except REPLY_LOST as exc:
            log.warning("could not ask Redis whether it is a cluster (%s); assuming a plain Redis", exc)
            return False
    return info.get("cluster_enabled") == 1


def node_client(cluster: RedisCluster, host: str, port: int) -> redis.Redis:
    """A plain client for one node of `cluster`, with its credentials and options (for pubsub and CONFIG)."""
    kwargs = dict(cluster.nodes_manager.connection_kwargs)
    kwargs.update(host=host, port=port)
    return redis.Redis(**kwargs)


def retry_once(action: Callable[[], T]) -> T:
    """Run an idempotent `action`; once more, on a fresh connection, if its reply was lost.

    Only for actions that leave the same state whether they run once or twice.
    """
    try:
        return action()
    except REPLY_LOST:
        return action()
