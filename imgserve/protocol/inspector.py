"""Read-only views of the queue, for /readyz, /metrics, the tools and the tests: how many jobs wait, which
workers are alive and what model each runs, what a worker holds, the dead letters. Nothing here changes
the queue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from .connection import retry_once
from .job import job_metadata
from .keys import Keys, models_key
from .queue import QueueBase

UNKNOWN_MODEL = {"model": "unknown", "weights": "unknown"}


class QueueInspector(QueueBase):
    """Reads of every shard that can be reached (REDIS_UNAVAILABLE only when none can)."""

    def depths(self) -> list[int | None]:
        """Jobs waiting in each shard, at every priority level (None: it cannot be reached)."""
        return [None if levels is None else sum(levels.values()) for levels in self.level_depths()]

    def level_depths(self) -> list[dict[str, int] | None]:
        """Jobs waiting at each priority level of each shard (None: the shard cannot be reached)."""
        return self._per_shard(self._levels_of)

    def _levels_of(self, keys: Keys) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for name in keys.levels.values():
                pipe.llen(name)
            return {level: int(n) for level, n in zip(keys.levels, pipe.execute(), strict=True)}

    def depth(self) -> int:
        """Number of jobs waiting in the queue, in every shard that can be reached."""
        return sum(n for n in self.depths() if n is not None)

    def dead_letter_counts(self) -> list[int | None]:
        """Dead letters kept in each shard, at most DEAD_LETTER_MAX each (None: it cannot be reached)."""
        return self._per_shard(lambda keys: int(self.redis.llen(keys.dead)))

    def peek(self) -> bytes | None:
        """A job at the head of a level of a shard exactly as stored, without claiming it; None if all are empty."""
        heads = self._per_shard(self._heads)
        return next((raw for shard in heads if shard for raw in shard if raw), None)

    def _heads(self, keys: Keys) -> list[bytes | None]:
        """The job at the head of each level of one shard (None for an empty level)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name in keys.levels.values():
                pipe.lindex(name, -1)
            return pipe.execute()

    def oldest_job_ages(self, now: float | None = None) -> list[float | None]:
        """Seconds since the oldest job at the head of a level of each shard was enqueued: 0 for an empty shard,
        None for one that cannot be reached. Reads the job's JSON head only, never its image (job_metadata); a
        job without a valid enqueued_at counts as new."""
        now = time.time() if now is None else now
        heads = self._per_shard(self._heads)
        return [None if shard is None else max(_age(head, now) for head in shard) for shard in heads]

    def worker_ids(self) -> set[str]:
        """Ids of the workers registered in any shard that can be reached."""
        members = self._per_shard(lambda keys: self.redis.smembers(keys.workers))
        return {w.decode() for shard in members if shard for w in shard}

    def live_worker_models(self) -> dict[str, dict]:
        """Each live worker (heartbeat not expired, in any shard that can be reached) and the model it announces."""
        shards = self._per_shard(self._heartbeats)
        return {
            worker: _model_of(beat) for shard in shards if shard for worker, beat in shard.items() if beat is not None
        }

    def registered_models(self) -> set[str]:
        """The names in the registry of models (keys.py {q}:models): models whose workers heartbeat(ed)."""
        return {name.decode() for name in retry_once(lambda: self.redis.smembers(models_key(self.base)))}

    def forget_model(self, name: str) -> None:
        """Take a model out of the registry (its workers are gone and no models file names it). Idempotent."""
        retry_once(lambda: self.redis.srem(models_key(self.base), name))

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The newest dead letters of every shard, parsed, newest first."""
        raws = self._per_shard(lambda keys: self.redis.lrange(keys.dead, 0, limit - 1))
        letters = [json.loads(raw.decode("utf-8", "replace")) for shard in raws if shard for raw in shard]
        return sorted(letters, key=lambda letter: letter.get("at", 0), reverse=True)[:limit]


def distinct_models(models: Iterable[dict]) -> list[dict]:
    """Each model once (the identity of each card: {"model", "weights"}, and "backend", "precision" when the
    card names them), in a stable order."""
    named = {
        (str(m.get("model", "unknown")), str(m.get("weights", "unknown")))
        + tuple((key, str(m[key])) for key in ("backend", "precision") if key in m)
        for m in models
    }
    return [{"model": model, "weights": weights, **dict(rest)} for model, weights, *rest in sorted(named)]


def _model_of(heartbeat: bytes) -> dict[str, str | int]:
    """The model card a heartbeat announces, its values as strings or whole numbers. The key is untrusted
    input: one that is not a JSON object (no worker writes one) still proves its worker alive, as the reaper
    sees it, with an unknown model."""
    try:
        model = json.loads(heartbeat)
    except (ValueError, RecursionError):
        model = None
    if not isinstance(model, dict):
        return dict(UNKNOWN_MODEL)
    return {str(k): v if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in model.items()}


def _age(head: bytes | None, now: float) -> float:
    """Seconds since a queued job was enqueued (0 for no job, or one without a valid enqueued_at)."""
    enqueued = job_metadata(head, len(head)).get("enqueued_at", now) if head else now
    return max(0.0, now - enqueued)
