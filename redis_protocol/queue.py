"""Queue operations for both sides: the web server enqueues and takes results; workers claim,
publish, acknowledge, heartbeat, release and reap. Thread-safe (redis-py pools its connections)."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

import redis

from . import scripts
from .connection import REPLY_LOST, connect, retry_once
from .job import DEFAULT_MAX_JOB_BYTES, DeadLetter, Job, error_result
from .keys import NOTIFY_FLAGS, SLOTS, SUBMITTED, Keys

if TYPE_CHECKING:
    from settings import Settings

# A result lives this long after its job's deadline: long enough for the web server that waits until
# the deadline to read it, short enough that a result nobody waits for anymore does not linger.
RESULT_GRACE = 5
# A result the web server took lives this long more, so that reading it again after a lost reply
# finds it still there.
TAKEN_RESULT_TTL_MS = 2000


class JobQueue:
    """One queue's operations."""

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        result_ttl: int = 3600,
        max_attempts: int = 3,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        dead_letter_max: int = 1000,
    ) -> None:
        self.redis = client
        self.keys = Keys(queue)
        self.result_ttl = result_ttl
        self.max_attempts = max_attempts
        self.max_job_bytes = max_job_bytes
        self.dead_letter_max = dead_letter_max
        self._ack = client.register_script(scripts.ACK)
        self._reap = client.register_script(scripts.REAP)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)

    @classmethod
    def from_settings(cls, config: Settings) -> JobQueue:
        """The queue that REDIS_URL, IMAGE_QUEUE and the limits in `config` describe."""
        return cls(
            connect(config.redis_url),
            config.image_queue,
            config.result_ttl,
            config.max_attempts,
            config.max_job_bytes,
            config.dead_letter_max,
        )

    # ---- web side -------------------------------------------------------------------------

    def enqueue(self, job: Job, max_queue: int) -> bool:
        """Push a job; False (and nothing queued) when the queue already held `max_queue` jobs."""
        return self.enqueue_many([job], max_queue)

    def enqueue_many(self, jobs: list[Job], max_queue: int) -> bool:
        """Push jobs in one command, first job first in line; False (and none queued) when that would take
        the queue past `max_queue` jobs.

        LPUSH is not idempotent, so after a lost reply the jobs are pushed again in a transaction that
        first removes the copies the lost LPUSH may have queued.
        """
        raws = [job.to_json() for job in jobs]
        try:
            depth = self.redis.lpush(self.keys.queue, *raws)
        except REPLY_LOST:
            with self.redis.pipeline(transaction=True) as pipe:
                for raw in raws:
                    pipe.lrem(self.keys.queue, 1, raw)
                pipe.lpush(self.keys.queue, *raws)
                depth = pipe.execute()[-1]
        if depth <= max_queue:
            return True
        # Over the limit: take them back. One a worker claimed meanwhile runs, and its result expires unread.
        withdrawn = [self._withdraw(raw) for raw in raws]
        return len(raws) == 1 and not withdrawn[0]

    def cancel(self, job: Job) -> bool:
        """Take a job out of the queue if no worker has claimed it yet; True if it was still queued.

        Idempotent. A job already claimed cannot be taken back: once its deadline has passed, the
        worker drops it instead of running it.
        """
        return self._withdraw(job.to_json())

    def _withdraw(self, raw: bytes) -> bool:
        return retry_once(lambda: self.redis.lrem(self.keys.queue, 1, raw)) == 1

    def submit(self, job: Job, max_queue: int) -> bool:
        """Queue a submitted job (origin SUBMITTED) with its ticket; False (nothing queued) when the queue is full.

        The ticket is written first, so that a worker which claims the job at once finds it.
        """
        ticket = self.keys.ticket(job.id)
        ttl = self._result_ttl(job.deadline, time.time())
        retry_once(lambda: self.redis.set(ticket, b"queued", ex=ttl))
        if self.enqueue(job, max_queue):
            return True
        retry_once(lambda: self.redis.delete(ticket))
        return False

    def job_status(self, job_id: str) -> dict | None:
        """A submitted job's status: {"status": "done" | "failed", ...its result} once it has a result, else
        {"status": "queued" | "running"}; None when no such job is known (never, expired or cancelled)."""

        def read() -> list[bytes | None]:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.keys.result(SUBMITTED, job_id))
                pipe.get(self.keys.ticket(job_id))
                return pipe.execute()

        result, ticket = retry_once(read)
        if result is not None:
            answer = json.loads(result)
            return {"status": "done" if answer.get("success") else "failed", **answer}
        return None if ticket is None else {"status": ticket.decode()}

    def cancel_submitted(self, job_id: str) -> int:
        """Cancel a submitted job no worker has taken: 1 done, 0 a worker has it, -1 no such job (CANCEL)."""
        return int(retry_once(lambda: self._cancel(keys=[self.keys.ticket(job_id)])))

    def take_result(self, origin: str, job_id: str) -> dict | None:
        """A job's result, or None if it is not there yet. The key then expires within seconds.

        GETEX rather than GETDEL: read twice (a retry after a lost reply), it answers the same.
        """
        key = self.keys.result(origin, job_id)
        raw = retry_once(lambda: self.redis.getex(key, px=TAKEN_RESULT_TTL_MS))
        return None if raw is None else json.loads(raw)

    def depth(self) -> int:
        """Number of jobs waiting in the queue."""
        return int(retry_once(lambda: self.redis.llen(self.keys.queue)))

    def dead_letter_count(self) -> int:
        """Number of dead letters kept (at most DEAD_LETTER_MAX)."""
        return int(retry_once(lambda: self.redis.llen(self.keys.dead)))

    def peek(self) -> bytes | None:
        """The job at the queue's head exactly as stored, without claiming it; None if the queue is empty."""
        return retry_once(lambda: self.redis.lindex(self.keys.queue, -1))

    def live_workers(self) -> int:
        """Number of registered workers whose heartbeat has not expired."""
        workers = [w.decode() for w in retry_once(lambda: self.redis.smembers(self.keys.workers))]
        if not workers:
            return 0
        return int(retry_once(lambda: self.redis.exists(*(self.keys.heartbeat(w) for w in workers))))

    def worker_models(self) -> list[dict]:
        """The distinct models ({"model", "weights"}) that live workers announce in their heartbeats."""
        workers = [w.decode() for w in retry_once(lambda: self.redis.smembers(self.keys.workers))]
        if not workers:
            return []
        beats = retry_once(lambda: self.redis.mget([self.keys.heartbeat(w) for w in workers]))
        models = {_model_of(beat) for beat in beats if beat is not None}
        return [dict(model) for model in sorted(models)]

    def take_tickets(self, jobs: list[Job]) -> set[str]:
        """Mark the submitted jobs among `jobs` as running; the ids of those that were cancelled (no ticket).

        SET XX GET: only a ticket that still exists changes, and the old value says whether it did.
        """
        submitted = [job.id for job in jobs if job.origin == SUBMITTED]
        if not submitted:
            return set()

        def take() -> list[bytes | None]:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in submitted:
                    pipe.set(self.keys.ticket(job_id), b"running", xx=True, get=True, keepttl=True)
                return pipe.execute()

        return {job_id for job_id, old in zip(submitted, retry_once(take), strict=True) if old is None}

    def claimed(self, worker: str) -> list[bytes]:
        """Every job a worker holds claimed and unacknowledged, in all its batch slots."""

        def read() -> list[list[bytes]]:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in self.keys.processing_lists(worker):
                    pipe.lrange(key, 0, -1)
                return pipe.execute()

        return [raw for slot in retry_once(read) for raw in slot]

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The newest dead letters, parsed."""
        raws = retry_once(lambda: self.redis.lrange(self.keys.dead, 0, limit - 1))
        return [json.loads(raw.decode("utf-8", "replace")) for raw in raws]

    def enable_notifications(self) -> bool:
        """Make sure keyspace events for SET are on, adding only the flags we need.

        Returns False when they are off and CONFIG is not allowed (managed Redis): then the
        caller polls.
        """
        try:
            current = self.notification_flags()
        except redis.ResponseError:
            return False
        flags = set(current)
        if "K" in flags and ("$" in flags or "A" in flags):
            return True
        try:
            self.redis.config_set("notify-keyspace-events", "".join(sorted(flags | set(NOTIFY_FLAGS))))
        except redis.ResponseError:
            return False
        return True

    def notification_flags(self) -> str:
        """The server's notify-keyspace-events flags (raises ResponseError where CONFIG is denied)."""
        value = next(iter(self.redis.config_get("notify-keyspace-events").values()), "")
        return value.decode() if isinstance(value, bytes) else value

    def probe_notifications(self, origin: str, probe_id: str) -> None:
        """Write a short-lived key under `origin`'s result pattern, to see whether its event arrives."""
        self.redis.set(self.keys.result(origin, probe_id), b"probe", px=5000)

    def result_channel_pattern(self, origin: str) -> str:
        db = int(self.redis.connection_pool.connection_kwargs.get("db", 0))
        return self.keys.result_channel_pattern(db, origin)

    # ---- worker side ----------------------------------------------------------------------

    def register(self, worker: str, heartbeat_ttl: float, model: dict | None = None) -> None:
        """Announce a worker: heartbeat first, so the reaper never sees it registered but dead."""
        self.heartbeat(worker, heartbeat_ttl, model)

    def heartbeat(self, worker: str, ttl: float, model: dict | None = None) -> None:
        """Renew the heartbeat, then (re)join the worker set, in one round trip. Idempotent.

        Rejoining matters: a worker reaped while paused or cut off from Redis, or forgotten by a
        restarted Redis, would otherwise never be reaped again, and a later crash would lose its jobs.
        """

        def beat() -> None:
            with self.redis.pipeline(transaction=False) as pipe:  # in this order, so no MULTI needed
                pipe.set(self.keys.heartbeat(worker), json.dumps(model or {}), px=int(ttl * 1000))
                pipe.sadd(self.keys.workers, worker)
                pipe.execute()

        retry_once(beat)

    def unregister(self, worker: str) -> None:
        """Clean exit: return anything still claimed to the queue (no attempt counted), then leave."""
        for slot in range(SLOTS):
            self.release(worker, "worker shut down", count_attempt=False, slot=slot)
        retry_once(lambda: self.redis.delete(self.keys.heartbeat(worker)))
        retry_once(lambda: self.redis.srem(self.keys.workers, worker))

    def claim_batch(
        self, worker: str, size: int, wait: float, block: float, slot: int = 0, resume: bool = False
    ) -> list[bytes]:
        """Move up to `size` jobs from the queue's head into one of this worker's batch slots.

        Blocks up to `block` seconds for the first job, learning in the same round trip how many more
        are waiting, and takes those (LMOVE, one per job: each moves one job atomically, so concurrent
        workers never share a job, and no job is copied through Lua). If the batch is not full, sleeps
        until `wait` seconds after the first job and takes what arrived meanwhile.

        The moves are not idempotent, so nothing resends them. `resume=True` after a failed claim:
        the batch then starts with whatever the slot already holds, the jobs a move whose reply was
        lost put there.
        """
        plist = self.keys.processing(worker, slot)
        batch = retry_once(lambda: self.redis.lrange(plist, 0, -1)) if resume else []
        waiting = size
        if not batch:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.blmove(self.keys.queue, plist, block, "RIGHT", "RIGHT")
                pipe.llen(self.keys.queue)
                first, waiting = pipe.execute()
            if first is None:
                return []
            batch = [first]
        until = time.monotonic() + wait
        batch += self._move(plist, min(size - len(batch), waiting))
        remaining = until - time.monotonic()
        if len(batch) < size and remaining > 0:
            # The wait is client-side: Redis times a blocking command out only on its clock tick
            # (100 ms at the default hz 10), and Redis 6 blocks forever on a timeout under 1 ms.
            time.sleep(remaining)
            batch += self._move(plist, min(size - len(batch), self.redis.llen(self.keys.queue)))
        return batch

    def _move(self, plist: str, count: int) -> list[bytes]:
        """Move up to `count` jobs from the queue's head to the end of `plist`, in one round trip."""
        if count <= 0:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.lmove(self.keys.queue, plist, "RIGHT", "RIGHT")
            return [raw for raw in pipe.execute() if raw is not None]

    def finish_batch(self, worker: str, results: list[tuple[Job, dict]], dead: list[DeadLetter], slot: int = 0) -> int:
        """Publish a batch's results, then acknowledge it (its dead letters written in the same step).

        Both steps are idempotent, so the caller may repeat the whole call after any failure. The
        acknowledgement is sent only once every result is written: when Redis refuses one (maxmemory)
        the error is raised and the batch stays claimed. A worker that dies in between has its batch
        requeued and answered again (at least once; a client keeps the first answer it reads).
        Returns the number of result keys written.
        """
        now = time.time()
        answered = [(self.keys.result(job.origin, job.id), payload, job.deadline) for job, payload in results]
        for letter in dead:
            if reply_to := letter.reply_to:
                error = error_result(f"bad job: {letter.reason}", 400)
                answered.append((self.keys.result(*reply_to), error, letter.metadata.get("deadline")))
        letters = [json.dumps({"reason": d.reason, "worker": worker, "at": now, "job": d.metadata}) for d in dead]

        def publish() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, payload, deadline in answered:
                    pipe.set(key, json.dumps(payload), ex=self._result_ttl(deadline, now))
                pipe.execute()  # raises the first error; the acknowledgement must not follow it

        retry_once(publish)
        plist = self.keys.processing(worker, slot)
        if letters:
            retry_once(lambda: self._ack(keys=[plist, self.keys.dead], args=[self.dead_letter_max, *letters]))
        else:  # nothing to write with it: a plain DEL acknowledges as well, one command instead of three
            retry_once(lambda: self.redis.delete(plist))
        return len(answered)

    def _result_ttl(self, deadline: float | None, now: float) -> int:
        """Seconds a result is kept: until RESULT_GRACE after its job's deadline, RESULT_TTL at most."""
        if deadline is None or not math.isfinite(deadline):
            return self.result_ttl
        return max(1, min(self.result_ttl, math.floor(deadline - now) + RESULT_GRACE))

    def release(self, worker: str, reason: str, count_attempt: bool = True, slot: int = 0) -> tuple[int, int]:
        """Return one batch slot's jobs to the queue's head; (requeued, dead-lettered). Idempotent."""
        keys = [self.keys.processing(worker, slot), self.keys.queue, self.keys.dead]
        args = [*self._release_args(), worker, int(count_attempt), reason]
        requeued, dead_lettered = retry_once(lambda: self._release(keys=keys, args=args))
        return int(requeued), int(dead_lettered)

    def reap(self) -> tuple[int, int, int]:
        """Release the jobs of every worker whose heartbeat expired; (workers, requeued, dead-lettered).

        Idempotent."""
        keys = [self.keys.workers, self.keys.queue, self.keys.dead]
        args = [*self._release_args(), self.keys.heartbeat_prefix, self.keys.processing_prefix, SLOTS]
        workers, requeued, dead_lettered = retry_once(lambda: self._reap(keys=keys, args=args))
        return int(workers), int(requeued), int(dead_lettered)

    def _release_args(self) -> list[object]:
        """ARGV[1..7] of the release and reap scripts (see scripts.py)."""
        return [
            self.keys.result_prefix,
            self.max_attempts,
            self.result_ttl,
            RESULT_GRACE,
            self.max_job_bytes,
            self.dead_letter_max,
            time.time(),
        ]


def _model_of(heartbeat: bytes) -> tuple[tuple[str, str], ...]:
    """A heartbeat's model as sorted (key, value) pairs ("alive" from older workers: unknown)."""
    try:
        model = json.loads(heartbeat)
    except ValueError:
        model = None
    if not isinstance(model, dict):
        return (("model", "unknown"), ("weights", "unknown"))
    return tuple(sorted((str(k), str(v)) for k, v in model.items()))
