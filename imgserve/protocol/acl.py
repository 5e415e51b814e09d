"""Least privilege in Redis: the ACL rules of the two roles, as arguments of ACL SETUSER (or lines of an ACL file).

    web     enqueue and cancel jobs, take results, count the queue, the dead letters and the live workers,
            and listen for its results' keyspace events. No CONFIG: where notifications are off, an
            operator turns them on (README, "Redis without CONFIG"); the web processes probe for them.
    worker  claim, publish, acknowledge, heartbeat, release and reap: the queue's keys only, no pub/sub.

Every command either role sends is listed, the Lua scripts' commands among them (Redis checks those too);
`tests/test_redis_acl.py` runs the whole stack with users made of exactly these rules. Print them for a
queue with `python -m tools.redis_acl`.
"""

from __future__ import annotations

from .keys import Keys, cache_key, lease_key, model_queue, models_key, owner_key, ticket_key

# Commands each role sends, by where: queue.py (both sides), listener.py and the scripts in scripts.py.
WEB_COMMANDS = (
    "lpush", "lrem", "multi", "exec",  # enqueue (again in MULTI after a lost reply), cancel a waiting job
    "getex", "get",                    # take a result; a submitted job's ticket and result (GET /jobs/<id>)
    "set", "del", "exists",            # a ticket; the probe for keyspace events; the result cache and its leases
    "evalsha", "script|load",          # the CANCEL and HOLD scripts (DELETE /jobs/<id>, MAX_QUEUE_PER_KEY)
    "zremrangebyscore", "zcard", "zadd", "zrange", "expireat", "zrem",  # HOLD; releasing a key's jobs
    "llen", "smembers", "mget",        # queue depth and dead letters (/metrics), live workers and models (/readyz)
    "srem",                            # GET /models forgets a model no worker serves and no models file names
    "psubscribe", "punsubscribe",      # the result listener
    "info", "ping", "select",          # is it a cluster (connection.is_cluster); health checks; a database but 0
)  # fmt: skip
WORKER_COMMANDS = (
    "blmove", "lmove", "llen", "lrange",     # claim a batch, resume a claim
    "set", "del", "mget",                    # publish results and take tickets (SET XX GET), acknowledge; liveness
    "sadd", "srem", "smembers", "exists",    # heartbeat, unregister; the reaper
    "evalsha", "script|load",                # the ACK, RELEASE and REAP scripts (loaded on first use)
    "rpush", "lpush", "ltrim", "get",        # inside the scripts: requeue, dead letters
    "info", "ping", "select",
)  # fmt: skip


def key_patterns(queue: str, role: str) -> list[str]:
    """The key patterns of `role` ("web" or "worker") for IMAGE_QUEUE `queue`.

    Each pattern also comes in the form of a sharded queue's keys, whose prefix is the hash tag
    `{queue:N}` (Redis Cluster), so that the same users serve either layout.
    """
    patterns = []
    # Every model's queue: IMAGE_QUEUE itself and IMAGE_QUEUE@NAME (keys.model_queue), each plain or sharded.
    other_models = model_queue(queue, "*")
    for keys in (Keys(queue), Keys(f"{{{queue}:*}}"), Keys(other_models), Keys(f"{{{other_models}:*}}")):
        if role == "worker":
            patterns += [keys.queue, f"{keys.queue}:*"]
        else:  # the web reads the workers' set and heartbeats, and the dead letters' count; writes the rest
            patterns += [*keys.levels.values(), keys.result_prefix + "*", keys.dead, keys.workers]
            patterns.append(keys.heartbeat_prefix + "*")
    if role == "web":  # tickets, owners, the cache and the models carry the queue's name untagged (keys.py)
        patterns += [ticket_key(queue, "*"), owner_key(queue, "*"), cache_key(queue, "*"), lease_key(queue, "*")]
        patterns.append(models_key(queue))
    return patterns


def rules(queue: str, role: str) -> list[str]:
    """ACL SETUSER rules for `role` ("web" or "worker"), without the user's name, `on` or its password.

    The web may subscribe to any channel (allchannels): Redis compares a PSUBSCRIBE pattern literally with
    the user's channel patterns, and each web process subscribes to a pattern naming its own random id. It
    learns no values that way, only the names of keys changed by string commands (keyspace events `K$`).
    """
    if role not in ("web", "worker"):
        raise ValueError(f"unknown role {role!r}: web or worker")
    commands = WEB_COMMANDS if role == "web" else WORKER_COMMANDS
    channels = "allchannels" if role == "web" else "resetchannels"
    return ["resetkeys", channels, "-@all", *(f"+{c}" for c in commands), *(f"~{p}" for p in key_patterns(queue, role))]
