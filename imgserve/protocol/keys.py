"""Every Redis key name of the protocol, declared once (`{q}` is IMAGE_QUEUE, default `image_queue`).

Each model has a queue of its own (model_queue): the model `resnet50` (the stack's default) has IMAGE_QUEUE
itself, any other model NAME the queue `{q}@NAME`. The keys of a model's queue are laid out below with that
queue's name as `{q}`, except the tickets, owner sets and the registry of models, which stay on IMAGE_QUEUE.

The queue is split into QUEUE_SHARDS shards. With one shard on a plain Redis the keys are named as below
with `{q}` as is; otherwise every key of shard N starts with the hash tag `{{q}:N}` (e.g. `{image_queue:2}`),
so that Redis Cluster puts all the keys of a shard in one slot and each Lua script touches one slot.
`{s}` below is that prefix: `{q}`, or `{{q}:N}`.

{s}                               LIST    pending jobs (JSON) of priority `normal` (the default). The web
                                          server LPUSHes; workers take from the right, so the list is FIFO and
                                          its right end is the head.
{s}:high, {s}:low                 LIST    the same for priorities `high` and `low` (priority.py: a worker takes
                                          from the three by weighted fair share). A job names its level
                                          (`priority`), and returns to that level's list when released or reaped.
{s}:processing:{worker}:{slot}    LIST    one claimed batch of one worker, until it is acknowledged.
                                          A worker has SLOTS batch slots; a serial worker uses slot 0.
{s}:heartbeat:{worker}            STRING  the worker's model card, as JSON ({"model", "weights", "backend",
                                          "precision", "input_size", "preprocess", "labels" (how many),
                                          "fingerprint", "source"}); TTL HEARTBEAT_TTL, renewed by a worker
                                          serving the shard.
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
                                          OPEN_OWNER without API keys), and " M" after them for a job of a
                                          model M other than `resnet50` (in M's queue, model_queue); deleted
                                          when it is cancelled. On IMAGE_QUEUE whatever the model, not in a
                                          shard: any web process finds it by the id alone. TTL until its result
                                          would expire. Only its owner sees or cancels the job.
{q}:owner:{owner}                 ZSET    the ids of one API key's jobs that count against MAX_QUEUE_PER_KEY,
                                          scored by their deadline: added when queued, removed when the web
                                          process has the result (/predict), the result is collected or the job
                                          cancelled (/jobs); entries past their deadline are dropped before
                                          each count, so a crashed web process leaks nothing for good. Not in a
                                          shard, and touched alone (the HOLD script). Only with API keys set.
{q}:cache:{digest}                STRING  a successful result JSON (without its job's id), shared by every
                                          identical request: `digest` is cache.request_digest of the prepared
                                          pixels, the model and top_k. TTL RESULT_CACHE_TTL; only written when
                                          RESULT_CACHE_TTL > 0. Not in a shard.
{q}:lease:{digest}                STRING  a token of the web request that queued a job for `digest`, while it
                                          waits for it: identical requests elsewhere wait for {q}:cache:{digest}
                                          instead of queueing their own. SET NX; TTL the job's timeout; deleted
                                          (LEASE_RELEASE, only by its holder) once the result is in. Not in a shard.
{q}:models                        SET     names of the models whose workers heartbeat: each worker adds its
                                          model with every heartbeat; GET /models lists them (with the web's
                                          models file) and removes a name whose queue has no live worker and
                                          that the file does not name. On IMAGE_QUEUE, not in a shard.
"""

from __future__ import annotations

from .priority import DEFAULT_PRIORITY, PRIORITIES

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


# Between IMAGE_QUEUE and a model's name in that model's queue: no key suffix starts with it, and IMAGE_QUEUE
# may not hold it (settings.py), so a model's keys never meet another queue's.
MODEL_SEPARATOR = "@"
# The model whose queue is IMAGE_QUEUE itself, as before there were several.
BASE_MODEL = "resnet50"


def model_queue(queue: str, model: str) -> str:
    """The queue of `model`'s jobs: IMAGE_QUEUE (`queue`) for BASE_MODEL, `{queue}@{model}` for any other."""
    return queue if model == BASE_MODEL else f"{queue}{MODEL_SEPARATOR}{model}"


def models_key(queue: str) -> str:
    """The registry of models whose workers heartbeat (a SET of names, on IMAGE_QUEUE)."""
    return f"{queue}:models"


class Keys:
    """The key names of one shard of a queue."""

    def __init__(self, queue: str, shard: int | None = None) -> None:
        """`shard` None: the untagged names of a single-shard queue on a plain Redis."""
        self.shard = shard or 0
        self.queue = queue if shard is None else f"{{{queue}:{shard}}}"
        # Each priority level's queue list; `normal`'s is the queue list itself (the name deployments know).
        self.levels = {
            level: self.queue if level == DEFAULT_PRIORITY else f"{self.queue}:{level}" for level in PRIORITIES
        }
        self.workers = f"{self.queue}:workers"
        self.dead = f"{self.queue}:dead"
        self.processing_prefix = f"{self.queue}:processing:"
        self.heartbeat_prefix = f"{self.queue}:heartbeat:"
        self.result_prefix = f"{self.queue}:result:"

    def level(self, priority: str) -> str:
        """The queue list of one priority level."""
        return self.levels[priority]

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


def ticket_value(status: str, shard: int, owner: str, model: str) -> str:
    """A ticket as keys.py spells it: "STATUS SHARD OWNER", and " MODEL" for a model other than BASE_MODEL."""
    words = [status, str(shard), owner or OPEN_OWNER] + ([] if model == BASE_MODEL else [model])
    return " ".join(words)


def owner_key(queue: str, owner: str) -> str:
    """The jobs of one owner (API key) that count against MAX_QUEUE_PER_KEY."""
    return f"{queue}:owner:{owner}"


def cache_key(queue: str, digest: str) -> str:
    """A cached result: the answer every request with this digest shares (cache.request_digest)."""
    return f"{queue}:cache:{digest}"


def lease_key(queue: str, digest: str) -> str:
    """The lease on a digest: which web request's job will answer it."""
    return f"{queue}:lease:{digest}"
