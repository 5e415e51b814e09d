"""What every role of the queue shares: the client, each shard's keys, the limits from the settings, and
the few reads that more than one role makes. The roles are in their own modules: web_queue.py (WebQueue),
worker_queue.py (WorkerQueue) and inspector.py (QueueInspector); all are thread-safe (redis-py pools its
connections).

The queue has QUEUE_SHARDS shards, each a complete queue of its own (keys.py); the web server spreads
jobs over them and a worker names the shard in each worker-side call."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Self

from redis.cluster import RedisCluster

from imgserve import logger

from .connection import REDIS_UNAVAILABLE, Client, T, connect, retry_once
from .job import DEFAULT_MAX_JOB_BYTES, error_result
from .keys import BASE_MODEL, Keys, model_queue, shard_keys

if TYPE_CHECKING:
    from imgserve.settings import Settings

# What a client hears of a result key or ticket that holds something no part of the service wrote.
UNREADABLE_RESULT = "the job's result in Redis could not be read"

log = logger.get(__name__)

# A result lives this long after its job's deadline: long enough for the web server that waits until
# the deadline to read it, short enough that a result nobody waits for anymore does not linger.
RESULT_GRACE = 5


class QueueBase:
    """One queue (all its shards) on one client; the role classes add the operations."""

    def __init__(
        self,
        client: Client,
        queue: str,
        result_ttl: int = 3600,
        max_attempts: int = 3,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        dead_letter_max: int = 1000,
        shards: int = 1,
        model: str = BASE_MODEL,
    ) -> None:
        """`queue` is IMAGE_QUEUE; the queue itself is `model`'s (keys.model_queue: IMAGE_QUEUE for resnet50)."""
        self.redis = client
        self.base = queue  # where tickets, owner sets and the registry of models live, whatever the model
        self.model = model
        self.name = model_queue(queue, model)
        queue = self.name
        self.cluster = isinstance(client, RedisCluster)
        self.shards = shard_keys(queue, shards, tagged=self.cluster)
        self.keys = self.shards[0]  # shard 0's keys: with QUEUE_SHARDS=1, the queue's
        self.result_ttl = result_ttl
        self.max_attempts = max_attempts
        self.max_job_bytes = max_job_bytes
        self.dead_letter_max = dead_letter_max

    @classmethod
    def from_settings(cls, config: Settings, model: str = BASE_MODEL) -> Self:
        """`model`'s queue, as REDIS_URL, IMAGE_QUEUE and the limits in `config` describe it."""
        return cls(
            connect(config.redis_url),
            config.image_queue,
            config.result_ttl,
            config.max_attempts,
            config.max_job_bytes,
            config.dead_letter_max,
            config.queue_shards,
            model=model,
        )

    @classmethod
    def sharing(cls, other: QueueBase, model: str | None = None) -> Self:
        """This role on the same client and limits as `other` (another role of the same process), for the queue
        of `model` (default: `other`'s)."""
        return cls(
            other.redis,
            other.base,
            other.result_ttl,
            other.max_attempts,
            other.max_job_bytes,
            other.dead_letter_max,
            len(other.shards),
            model=other.model if model is None else model,
        )

    def shards_of(self, model: str) -> list[Keys]:
        """The shards of `model`'s queue (on the same IMAGE_QUEUE, with as many shards)."""
        if model == self.model:
            return self.shards
        return shard_keys(model_queue(self.base, model), len(self.shards), tagged=self.cluster)

    def _shards(self, shards: Iterable[int] | None) -> list[Keys]:
        return self.shards if shards is None else [self.shards[shard] for shard in shards]

    def _per_shard(self, read: Callable[[Keys], T]) -> list[T | None]:
        """`read` of every shard, None for a shard that cannot be reached while another can (a cluster with
        a primary down: the other shards keep working); REDIS_UNAVAILABLE when none can. Idempotent reads only."""
        replies: list[T | None] = []
        error: Exception | None = None
        for keys in self.shards:
            try:
                replies.append(retry_once(lambda keys=keys: read(keys)))
            except REDIS_UNAVAILABLE as exc:
                replies.append(None)
                error = exc
        if error is not None and all(reply is None for reply in replies):
            raise error
        return replies

    def _heartbeats(self, keys: Keys) -> dict[str, bytes | None]:
        """Each worker registered in one shard, and its heartbeat there (None once expired)."""
        workers = [w.decode() for w in self.redis.smembers(keys.workers)]
        beats = self.redis.mget([keys.heartbeat(w) for w in workers]) if workers else []
        return dict(zip(workers, beats, strict=True))

    def claimed(self, worker: str, shard: int | None = None) -> list[bytes]:
        """Every job a worker holds claimed and unacknowledged, in all its batch slots (of one shard, or all)."""
        shards = self.shards if shard is None else [self.shards[shard]]

        def read() -> list[list[bytes]]:
            with self.redis.pipeline(transaction=False) as pipe:
                for keys in shards:
                    for key in keys.processing_lists(worker):
                        pipe.lrange(key, 0, -1)
                return pipe.execute()

        return [raw for slot in retry_once(read) for raw in slot]

    def _result_ttl(self, deadline: float | None, now: float) -> int:
        """Seconds a result is kept: until RESULT_GRACE after its job's deadline, RESULT_TTL at most."""
        if deadline is None or not math.isfinite(deadline):
            return self.result_ttl
        return max(1, min(self.result_ttl, math.floor(deadline - now) + RESULT_GRACE))


def read_result(raw: bytes, job_id: str) -> dict:
    """A result key's value as a well-formed result: {"success": True, ...} (`predictions` a list) or
    {"success": False, "error": str, "status": 400..599}. Anything else (not UTF-8, not JSON, not an object,
    fields of the wrong types) is logged and becomes a failure: the key is untrusted input like a job."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and answer.get("success") is True and isinstance(answer.get("predictions", []), list):
        return answer
    if isinstance(answer, dict) and answer.get("success") is False and isinstance(answer.get("error"), str):
        status = answer.get("status")
        valid = isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599
        return {**answer, "status": status if valid else 500}
    log.warning("job %s: unreadable result %s", logger.untrusted(job_id), logger.untrusted(raw))
    return error_result(UNREADABLE_RESULT, 502)
