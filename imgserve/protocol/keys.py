"""Every Redis key name of the protocol, declared once (`{q}` is IMAGE_QUEUE, default `image_queue`).

The queue is split into QUEUE_SHARDS shards. With one shard on a plain Redis the keys are named as below
with `{q}` as is; otherwise every key of shard N starts with the hash tag `{{q}:N}` (e.g. `{image_queue:2}`),
so that Redis Cluster puts all the keys of a shard in one slot and each Lua script touches one slot.
`{s}` below is that prefix: `{q}`, or `{{q}:N}`.

{s}                               LIST    pending jobs (JSON). The web server LPUSHes; workers take from
                                          the right, so the list is FIFO and its right end is the head.
{s}:processing:{worker}:{slot}    LIST    one claimed batch of one worker, until it is acknowledged.
                                          A worker has SLOTS batch slots; a serial worker uses slot 0.
{s}:heartbeat:{worker}            STRING  the worker's model, as JSON ({"model", "weights", "backend",
                                          "precision"}); TTL HEARTBEAT_TTL, renewed by a worker serving the shard.
{s}:workers                       SET     ids of workers that may own processing lists in the shard.
{s}:dead                          LIST    dead letters, newest first, at most DEAD_LETTER_MAX:
                                          {"reason", "worker", "at", "job": metadata}, never the image.
{s}:result:{origin}:{id}          STRING  result JSON for job `id` sent by web process `origin` to this
                                          shard; expires a few seconds after the job's deadline (RESULT_TTL
                                          at most). Submitted jobs (POST /jobs) have the origin SUBMITTED:
                                          no web process waits for them, any one reads their results.
{q}:ticket:{id}                   STRING  a submitted job's status, shard and owner until it has a result:
                                          "queued N O", then "running N O" once a worker took it (N the shard,
                                          O the owner: security.owner_id of the API key that submitted it, or
                                          OPEN_OWNER without API keys); deleted when it is cancelled. Not in a
                                          shard: any web process finds it by the id alone. TTL until its result
                                          would expire. Only its owner sees or cancels the job.
{q}:owner:{owner}                 ZSET    the ids of one API key's jobs that count against MAX_QUEUE_PER_KEY,
                                          scored by their deadline: added when queued, removed when the web
                                          process has the result (/predict), the result is collected or the job
                                          cancelled (/jobs); entries past their deadline are dropped before
                                          each count, so a crashed web process leaks nothing for good. Not in a
                                          shard, and touched alone (the HOLD script). Only with API keys set.
"""

from __future__ import annotations

# Batch slots per worker: each claimed batch has a processing list of its own, so acknowledging a batch
# deletes exactly that batch's jobs while the worker holds others (one being decoded, PREFETCH_BATCHES
# waiting, one in the model, some being published) in its other slots.
SLOTS = 8

# Keyspace events for string commands: enough to see the SET of a result key.
NOTIFY_FLAGS = "K$"

# The origin of submitted jobs (POST /jobs): no web process waits on them, any one reads their results.
# Web processes' own origins are 12 hex digits, so they never meet this one.
SUBMITTED = "submitted"

# The owner of every job when no API keys are set: everyone is one client. Owner ids of keys are hex digits.
OPEN_OWNER = "anyone"


class Keys:
    """The key names of one shard of a queue."""

    def __init__(self, queue: str, shard: int | None = None) -> None:
        """`shard` None: the untagged names of a single-shard queue on a plain Redis."""
        self.shard = shard or 0
        self.queue = queue if shard is None else f"{{{queue}:{shard}}}"
        self.workers = f"{self.queue}:workers"
        self.dead = f"{self.queue}:dead"
        self.processing_prefix = f"{self.queue}:processing:"
        self.heartbeat_prefix = f"{self.queue}:heartbeat:"
        self.result_prefix = f"{self.queue}:result:"

    def processing(self, worker: str, slot: int = 0) -> str:
        """The processing list of one of a worker's batch slots."""
        return f"{self.processing_prefix}{worker}:{slot}"

    def processing_lists(self, worker: str) -> list[str]:
        """Every processing list a worker may own in this shard."""
        return [self.processing(worker, slot) for slot in range(SLOTS)]

    def heartbeat(self, worker: str) -> str:
        return self.heartbeat_prefix + worker

    def result(self, origin: str, job_id: str) -> str:
        return f"{self.result_prefix}{origin}:{job_id}"


def shard_keys(queue: str, shards: int, tagged: bool) -> list[Keys]:
    """The keys of every shard: hash-tagged when `tagged` (a cluster) or when there are several shards."""
    if shards == 1 and not tagged:
        return [Keys(queue)]
    return [Keys(queue, shard) for shard in range(shards)]


def result_channel_pattern(queue: str, tagged: bool, db: int, origin: str) -> str:
    """The keyspace-notification channels of every result key of one web process, in every shard."""
    prefix = f"{{{queue}:*}}" if tagged else queue  # braces are literal in a glob pattern
    return f"__keyspace@{db}__:{prefix}:result:{origin}:*"


def ticket_key(queue: str, job_id: str) -> str:
    """The ticket of a submitted job: its status and shard, found by the id alone."""
    return f"{queue}:ticket:{job_id}"


def owner_key(queue: str, owner: str) -> str:
    """The jobs of one owner (API key) that count against MAX_QUEUE_PER_KEY."""
    return f"{queue}:owner:{owner}"
