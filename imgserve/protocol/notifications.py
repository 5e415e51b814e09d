"""Keyspace notifications for result keys: turning them on (on each server that holds keys), reading the
flags, the channels a web process subscribes to, and the probe key that tells whether events arrive where
CONFIG is denied. The ResultListener (listener.py) uses them; so do the tools that watch results."""

from __future__ import annotations

import redis

from .keys import NOTIFY_FLAGS, result_channel_pattern
from .queue import QueueBase


def servers(queue: QueueBase) -> list[redis.Redis]:
    """A client for each server that holds keys: the plain Redis, or every primary of a cluster."""
    if not queue.cluster:
        return [queue.redis]
    return [queue.redis.get_redis_connection(node) for node in queue.redis.get_primaries()]


def enable_everywhere(queue: QueueBase) -> bool:
    """Turn on keyspace events for SET on every server (enable_notifications); False if any refused."""
    return all([enable_notifications(server) for server in servers(queue)])


def common_flags(queue: QueueBase) -> str:
    """The notify-keyspace-events flags every server has (raises ResponseError where CONFIG is denied)."""
    flags = [set(notification_flags(server)) for server in servers(queue)]
    return "".join(sorted(set.intersection(*flags)))


def channel_pattern(queue: QueueBase, origin: str) -> str:
    """The keyspace-notification channels of `origin`'s result keys, in every shard (one server's db)."""
    db = 0 if queue.cluster else int(queue.redis.connection_pool.connection_kwargs.get("db", 0))
    return result_channel_pattern(queue.name, queue.keys.queue != queue.name, db, origin)


def write_probe(queue: QueueBase, origin: str, probe_id: str, shard: int = 0) -> None:
    """Write a short-lived key under `origin`'s result pattern in `shard`, to see whether its event arrives."""
    queue.redis.set(queue.shards[shard].result(origin, probe_id), b"probe", px=5000)


def enable_notifications(client: redis.Redis) -> bool:
    """Make sure one server's keyspace events for SET are on, adding only the flags we need.

    Returns False when they are off and CONFIG is not allowed (managed Redis): then the caller polls.
    """
    try:
        flags = set(notification_flags(client))
    except redis.ResponseError:
        return False
    if "K" in flags and ("$" in flags or "A" in flags):
        return True
    try:
        client.config_set("notify-keyspace-events", "".join(sorted(flags | set(NOTIFY_FLAGS))))
    except redis.ResponseError:
        return False
    return True


def notification_flags(client: redis.Redis) -> str:
    """One server's notify-keyspace-events flags (raises ResponseError where CONFIG is denied)."""
    value = next(iter(client.config_get("notify-keyspace-events").values()), "")
    return value.decode() if isinstance(value, bytes) else value
