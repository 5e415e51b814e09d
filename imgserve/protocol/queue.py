"""Queue operations for both sides: the web server enqueues and takes results; workers claim,
publish, acknowledge, heartbeat, release and reap. Thread-safe (redis-py pools its connections).

The queue has QUEUE_SHARDS shards, each a complete queue of its own (keys.py); the web server spreads
jobs over them and a worker names the shard in each worker-side call."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import redis
from redis.cluster import RedisCluster

from imgserve import logger

from . import scripts
from .connection import REDIS_UNAVAILABLE, REPLY_LOST, Client, T, connect, retry_once
from .job import DEFAULT_MAX_JOB_BYTES, DeadLetter, Job, error_result, job_metadata, unanswerable
from .keys import (
    NOTIFY_FLAGS,
    OPEN_OWNER,
    SLOTS,
    SUBMITTED,
    Keys,
    owner_key,
    result_channel_pattern,
    shard_keys,
    ticket_key,
)

if TYPE_CHECKING:
    from imgserve.settings import Settings

TICKET_STATUSES = ("queued", "running")
# What a client hears of a result key or ticket that holds something no part of the service wrote.
UNREADABLE_RESULT = "the job's result in Redis could not be read"

log = logger.get(__name__)

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
        client: Client,
        queue: str,
        result_ttl: int = 3600,
        max_attempts: int = 3,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        dead_letter_max: int = 1000,
        shards: int = 1,
    ) -> None:
        self.redis = client
        self.name = queue
        self.cluster = isinstance(client, RedisCluster)
        self.shards = shard_keys(queue, shards, tagged=self.cluster)
        self.keys = self.shards[0]  # the only shard's keys, on a plain Redis with QUEUE_SHARDS=1
        self._turn = itertools.count(random.randrange(shards))  # where this process starts spreading jobs
        self.result_ttl = result_ttl
        self.max_attempts = max_attempts
        self.max_job_bytes = max_job_bytes
        self.dead_letter_max = dead_letter_max
        self._ack = client.register_script(scripts.ACK)
        self._reap = client.register_script(scripts.REAP)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._hold = client.register_script(scripts.HOLD)

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
            config.queue_shards,
        )

    # ---- web side -------------------------------------------------------------------------

    def enqueue(self, job: Job, max_queue: int) -> bool:
        """Push a job to the next shard in turn, or the next that is not full (enqueue_many)."""
        return self.enqueue_many([job], max_queue)

    def enqueue_many(self, jobs: list[Job], max_queue: int) -> bool:
        """Push jobs in one command to one shard, first job first in line, so that a worker can run them in
        one batch: the next shard in turn, or the next that has room for them; False (and nothing queued)
        when none has, each holding its share of `max_queue`. Sets each job's `shard`.

        A shard that cannot be reached raises REDIS_UNAVAILABLE: its jobs may be queued there, so they are
        not pushed to another shard as well.
        """
        raws, count = [job.to_json() for job in jobs], len(self.shards)
        limit = math.ceil(max_queue / count)
        first = next(self._turn)
        for shard in ((first + i) % count for i in range(count)):
            if self._push(self.shards[shard], raws, limit):
                for job in jobs:
                    job.shard = shard
                return True
        return False

    def _push(self, keys: Keys, raws: list[bytes], limit: int) -> bool:
        """LPUSH to one shard; False (and nothing left queued) when that took it past `limit` jobs.

        LPUSH is not idempotent, so after a lost reply the jobs are pushed again in a transaction that
        first removes the copies the lost LPUSH may have queued.
        """
        try:
            depth = self.redis.lpush(keys.queue, *raws)
        except REPLY_LOST:
            with self.redis.pipeline(transaction=True) as pipe:
                for raw in raws:
                    pipe.lrem(keys.queue, 1, raw)
                pipe.lpush(keys.queue, *raws)
                depth = pipe.execute()[-1]
        if depth <= limit:
            return True
        # Over the limit: take them back. One a worker claimed meanwhile runs (a lone job is then accepted
        # after all; among several, its result expires unread).
        withdrawn = [self._withdraw(keys, raw) for raw in raws]
        return len(raws) == 1 and not withdrawn[0]

    def submit(self, job: Job, max_queue: int) -> bool:
        """Queue a submitted job (origin SUBMITTED) with its ticket; False (nothing queued) when the queue is full.

        The ticket is written first, so that a worker which claims the job at once finds it; it names the
        shard the job goes to, so that any web process finds the result.
        """
        ticket, ttl = ticket_key(self.name, job.id), self._result_ttl(job.deadline, time.time())
        limit = math.ceil(max_queue / len(self.shards))
        shard = self._next_with_room(limit)
        if shard is None:
            return False
        retry_once(lambda: self.redis.set(ticket, f"queued {shard} {job.owner or OPEN_OWNER}", ex=ttl))
        if self._push(self.shards[shard], [job.to_json()], limit):
            job.shard = shard
            return True
        retry_once(lambda: self.redis.delete(ticket))
        return False

    def _next_with_room(self, limit: int) -> int | None:
        """The next shard in turn whose queue holds fewer than `limit` jobs; None when every one is full."""
        count = len(self.shards)
        first = next(self._turn)
        for shard in ((first + i) % count for i in range(count)):
            if retry_once(lambda shard=shard: self.redis.llen(self.shards[shard].queue)) < limit:
                return shard
        return None

    def job_status(self, job_id: str, owner: str = OPEN_OWNER) -> dict | None:
        """A submitted job's status as `owner` may see it: {"status": "done", ...its result} or {"status":
        "failed", "error"} once it has a result, else {"status": "queued" | "running"}; None when `owner` knows
        no such job (never, expired, cancelled, another owner's, or an unreadable ticket)."""
        raw = retry_once(lambda: self.redis.get(ticket_key(self.name, job_id)))
        ticket = None if raw is None else self._read_ticket(job_id, raw)
        if ticket is None or ticket[2] != owner:
            return None
        status, shard, _ = ticket
        result = retry_once(lambda: self.redis.get(self.shards[shard].result(SUBMITTED, job_id)))
        if result is None:
            return {"status": status}
        answer = read_result(result, job_id)
        if not answer["success"]:
            return {"status": "failed", "error": answer["error"]}
        return {"status": "done", **{k: v for k, v in answer.items() if k not in ("success", "status", "id")}}

    def _read_ticket(self, job_id: str, raw: bytes) -> tuple[str, int, str] | None:
        """A ticket's (status, shard, owner); None (logged) for one no web process wrote."""
        words = raw.decode("utf-8", "replace").split(" ")
        if len(words) == 3 and words[0] in TICKET_STATUSES and words[1].isascii() and words[1].isdigit():
            if int(words[1]) < len(self.shards):
                return words[0], int(words[1]), words[2]
        log.warning("job %s: unreadable ticket %s", logger.untrusted(job_id), logger.untrusted(raw))
        return None

    def cancel_submitted(self, job_id: str, owner: str = OPEN_OWNER) -> int:
        """Cancel `owner`'s submitted job that no worker has taken: 1 done, 0 a worker has it, -1 `owner` knows
        no such job (CANCEL)."""
        return int(retry_once(lambda: self._cancel(keys=[ticket_key(self.name, job_id)], args=[owner])))

    def hold(self, owner: str, jobs: list[Job], limit: int) -> bool:
        """Count `jobs` against `owner`'s share of the queue (HOLD); False (nothing counted) when they would
        take it past `limit`. Each is counted until `release_hold`, or its deadline at the latest."""
        args = [time.time(), limit, max(job.deadline for job in jobs), *(job.id for job in jobs)]
        return bool(retry_once(lambda: self._hold(keys=[owner_key(self.name, owner)], args=args)))

    def release_hold(self, owner: str, job_ids: list[str]) -> None:
        """Stop counting jobs against `owner`'s share: answered, collected, cancelled or refused. Idempotent."""
        retry_once(lambda: self.redis.zrem(owner_key(self.name, owner), *job_ids))

    def take_tickets(self, jobs: list[Job], shard: int = 0) -> set[str]:
        """Mark the submitted jobs among `jobs` (claimed from `shard`) as running, keeping their owner; the ids
        of those whose ticket is gone: cancelled. SET XX GET changes only a ticket that still exists, and says
        if it did."""
        submitted = [(job.id, job.owner) for job in jobs if job.origin == SUBMITTED]
        if not submitted:
            return set()

        def take() -> list[bytes | None]:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, owner in submitted:
                    ticket = f"running {shard} {owner or OPEN_OWNER}"
                    pipe.set(ticket_key(self.name, job_id), ticket, xx=True, get=True, keepttl=True)
                return pipe.execute()

        return {job_id for (job_id, _), old in zip(submitted, retry_once(take), strict=True) if old is None}

    def cancel(self, job: Job) -> bool:
        """Take a job out of its shard's queue if no worker has claimed it yet; True if it was still queued.

        Idempotent. A job already claimed cannot be taken back: once its deadline has passed, the
        worker drops it instead of running it.
        """
        return self._withdraw(self.shards[job.shard], job.to_json())

    def _withdraw(self, keys: Keys, raw: bytes) -> bool:
        return retry_once(lambda: self.redis.lrem(keys.queue, 1, raw)) == 1

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict | None:
        """A job's result, or None if it is not there yet. The key then expires within seconds.

        GETEX rather than GETDEL: read twice (a retry after a lost reply), it answers the same.
        """
        key = self.shards[shard].result(origin, job_id)
        raw = retry_once(lambda: self.redis.getex(key, px=TAKEN_RESULT_TTL_MS))
        return None if raw is None else read_result(raw, job_id)

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

    def depths(self) -> list[int | None]:
        """Jobs waiting in each shard (None: it cannot be reached)."""
        return self._per_shard(lambda keys: int(self.redis.llen(keys.queue)))

    def depth(self) -> int:
        """Number of jobs waiting in the queue, in every shard that can be reached."""
        return sum(n for n in self.depths() if n is not None)

    def dead_letter_counts(self) -> list[int | None]:
        """Dead letters kept in each shard, at most DEAD_LETTER_MAX each (None: it cannot be reached)."""
        return self._per_shard(lambda keys: int(self.redis.llen(keys.dead)))

    def dead_letter_count(self) -> int:
        """Number of dead letters kept, in every shard that can be reached."""
        return sum(n for n in self.dead_letter_counts() if n is not None)

    def peek(self) -> bytes | None:
        """A job at a shard's head exactly as stored, without claiming it; None if every shard is empty."""
        return next((raw for raw in self._per_shard(lambda keys: self.redis.lindex(keys.queue, -1)) if raw), None)

    def worker_ids(self) -> set[str]:
        """Ids of the workers registered in any shard that can be reached."""
        members = self._per_shard(lambda keys: self.redis.smembers(keys.workers))
        return {w.decode() for shard in members if shard for w in shard}

    def live_workers(self) -> int:
        """Number of registered workers whose heartbeat has not expired, in any shard that can be reached."""
        return len(self.live_worker_models())

    def worker_models(self) -> list[dict]:
        """The distinct models ({"model", "weights"}) that live workers announce in their heartbeats."""
        return distinct_models(self.live_worker_models().values())

    def live_worker_models(self) -> dict[str, dict]:
        """Each live worker (heartbeat not expired, in any shard that can be reached) and the model it announces."""
        shards = self._per_shard(self._heartbeats)
        return {
            worker: dict(_model_of(beat))
            for shard in shards
            if shard
            for worker, beat in shard.items()
            if beat is not None
        }

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

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The newest dead letters of every shard, parsed, newest first."""
        raws = self._per_shard(lambda keys: self.redis.lrange(keys.dead, 0, limit - 1))
        letters = [json.loads(raw.decode("utf-8", "replace")) for shard in raws if shard for raw in shard]
        return sorted(letters, key=lambda letter: letter.get("at", 0), reverse=True)[:limit]

    def nodes(self) -> list[redis.Redis]:
        """A client for each server that holds keys: the plain Redis, or every primary of a cluster."""
        if not self.cluster:
            return [self.redis]
        return [self.redis.get_redis_connection(node) for node in self.redis.get_primaries()]

    def enable_notifications(self) -> bool:
        """Turn on keyspace events for SET on every server (enable_notifications); False if any refused."""
        return all([enable_notifications(node) for node in self.nodes()])

    def notification_flags(self) -> str:
        """The notify-keyspace-events flags every server has (raises ResponseError where CONFIG is denied)."""
        flags = [set(notification_flags(node)) for node in self.nodes()]
        return "".join(sorted(set.intersection(*flags)))

    def probe_notifications(self, origin: str, probe_id: str, shard: int = 0) -> None:
        """Write a short-lived key under `origin`'s result pattern in `shard`, to see whether its event arrives."""
        self.redis.set(self.shards[shard].result(origin, probe_id), b"probe", px=5000)

    def result_channel_pattern(self, origin: str) -> str:
        """The keyspace-notification channels of `origin`'s result keys, in every shard (one server's db)."""
        db = 0 if self.cluster else int(self.redis.connection_pool.connection_kwargs.get("db", 0))
        return result_channel_pattern(self.name, self.keys.queue != self.name, db, origin)

    # ---- worker side ----------------------------------------------------------------------

    def register(
        self, worker: str, heartbeat_ttl: float, shards: Iterable[int] | None = None, model: dict | None = None
    ) -> None:
        """Announce a worker in the shards it serves (default all): heartbeat first, so the reaper never
        sees it registered but dead. `model` ({"model", "weights"}) is what its heartbeat says it runs."""
        self.heartbeat(worker, heartbeat_ttl, shards, model)

    def heartbeat(
        self, worker: str, ttl: float, shards: Iterable[int] | None = None, model: dict | None = None
    ) -> None:
        """Renew the heartbeat, then (re)join the worker set, in one round trip per shard. Idempotent.

        Rejoining matters: a worker reaped while paused or cut off from Redis, or forgotten by a
        restarted Redis, would otherwise never be reaped again, and a later crash would lose its jobs.
        """
        for keys in self._shards(shards):

            def beat(keys: Keys = keys) -> None:
                with self.redis.pipeline(transaction=False) as pipe:  # in this order, so no MULTI needed
                    pipe.set(keys.heartbeat(worker), json.dumps(model or {}), px=int(ttl * 1000))
                    pipe.sadd(keys.workers, worker)
                    pipe.execute()

            retry_once(beat)

    def unregister(self, worker: str, shards: Iterable[int] | None = None) -> None:
        """Clean exit: return anything still claimed to the queue (no attempt counted), then leave."""
        for keys in self._shards(shards):
            for slot in range(SLOTS):
                self.release(worker, "worker shut down", count_attempt=False, slot=slot, shard=keys.shard)
            retry_once(lambda keys=keys: self.redis.delete(keys.heartbeat(worker)))
            retry_once(lambda keys=keys: self.redis.srem(keys.workers, worker))

    def _shards(self, shards: Iterable[int] | None) -> list[Keys]:
        return self.shards if shards is None else [self.shards[shard] for shard in shards]

    def claim_batch(
        self,
        worker: str,
        size: int,
        wait: float,
        block: float,
        slot: int = 0,
        shard: int = 0,
        only_into_empty: bool = False,
    ) -> list[bytes]:
        """Move up to `size` jobs from a shard's head into one of this worker's batch slots in that shard.

        Blocks up to `block` seconds for the first job (not at all when `block` is 0), learning in the
        same round trip how many more are waiting, and takes those (LMOVE, one per job: each moves one
        job atomically, so concurrent workers never share a job, and no job is copied through Lua). If
        the batch is not full, sleeps until `wait` seconds after the first job and takes what arrived
        meanwhile.

        The moves are not idempotent, so nothing resends them: after a failed claim the caller releases
        the slot (its jobs back to the queue's head) before claiming into it again.

        `only_into_empty` (a worker's claims): acknowledging a batch deletes its whole slot, so a batch must
        never join jobs left in the slot by one that was not acknowledged. The same round trip reads the
        slot's length first; if it held jobs, the slot is released (with the job just moved) and nothing
        is claimed this time.
        """
        keys = self.shards[shard]
        plist = keys.processing(worker, slot)
        with self.redis.pipeline(transaction=False) as pipe:
            if only_into_empty:
                pipe.llen(plist)
            if block > 0:
                pipe.blmove(keys.queue, plist, block, "RIGHT", "RIGHT")
            else:
                pipe.lmove(keys.queue, plist, "RIGHT", "RIGHT")
            pipe.llen(keys.queue)
            *held, first, waiting = pipe.execute()
        if held and held[0]:
            log.error(
                "batch slot %d of shard %d still held %d job(s) when claimed into; releasing it", slot, shard, held[0]
            )
            self.release(worker, "left in a batch slot that was claimed into again", slot=slot, shard=shard)
            return []
        if first is None:
            return []
        until = time.monotonic() + wait
        batch = [first, *self._move(keys, plist, min(size - 1, waiting))]
        remaining = until - time.monotonic()
        if len(batch) < size and remaining > 0:
            # The wait is client-side: Redis times a blocking command out only on its clock tick
            # (100 ms at the default hz 10), and Redis 6 blocks forever on a timeout under 1 ms.
            time.sleep(remaining)
            batch += self._move(keys, plist, min(size - len(batch), self.redis.llen(keys.queue)))
        return batch

    def _move(self, keys: Keys, plist: str, count: int) -> list[bytes]:
        """Move up to `count` jobs from the shard's head to the end of `plist`, in one round trip."""
        if count <= 0:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.lmove(keys.queue, plist, "RIGHT", "RIGHT")
            return [raw for raw in pipe.execute() if raw is not None]

    def finish_batch(
        self, worker: str, results: list[tuple[Job, dict]], dead: list[DeadLetter], slot: int = 0, shard: int = 0
    ) -> list[DeadLetter]:
        """Publish a batch's results, then acknowledge it (its dead letters written in the same step).

        Both steps are idempotent, so the caller may repeat the whole call after any failure. The
        acknowledgement is sent only once every result is written: when Redis is unavailable (or refuses
        writes: maxmemory) the error is raised and the batch stays claimed. A result that cannot be written
        for any other reason (JSON cannot carry it, Redis refuses that one key) costs its job alone: the job
        is dead-lettered and the rest published. A worker that dies in between has its batch requeued and
        answered again (at least once; a client keeps the first answer it reads). Every key is in the
        batch's shard (one slot in a cluster). Returns the dead letters added for unwritable results.
        """
        keys, now = self.shards[shard], time.time()
        writes = [(keys.result(job.origin, job.id), payload, job.deadline) for job, payload in results]
        # A failed error answer costs only that answer: its dead letter is written all the same.
        failed = self._publish(writes + _answers(keys, dead), now)
        unwritable = [unanswerable(results[i][0], error, self.max_job_bytes) for i, error in failed if i < len(results)]
        self._publish(_answers(keys, unwritable), now)
        letters = [
            json.dumps({"reason": d.reason, "worker": worker, "at": now, "job": d.metadata})
            for d in [*dead, *unwritable]
        ]
        plist = keys.processing(worker, slot)
        if letters:
            retry_once(lambda: self._ack(keys=[plist, keys.dead], args=[self.dead_letter_max, *letters]))
        else:  # nothing to write with it: a plain DEL acknowledges as well, one command instead of three
            retry_once(lambda: self.redis.delete(plist))
        return unwritable

    def _publish(self, writes: list[tuple[str, dict, float | None]], now: float) -> list[tuple[int, Exception]]:
        """SET each (key, payload, deadline); the index and error of each write that failed for a reason other
        than Redis being unavailable (which is raised: then nothing may be acknowledged)."""
        try:
            retry_once(lambda: self._set_results(writes, now))
            return []
        except REDIS_UNAVAILABLE:
            raise
        except Exception:  # noqa: BLE001 - some write is at fault: find which, one at a time (SET is idempotent)
            pass
        failed = []
        for i, write in enumerate(writes):
            try:
                retry_once(lambda write=write: self._set_results([write], now))
            except REDIS_UNAVAILABLE:
                raise
            except Exception as exc:  # noqa: BLE001 - this job's own fault: it is dead-lettered
                failed.append((i, exc))
        return failed

    def _set_results(self, writes: list[tuple[str, dict, float | None]], now: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for key, payload, deadline in writes:
                pipe.set(key, json.dumps(payload), ex=self._result_ttl(deadline, now))
            pipe.execute()  # raises the first error; the acknowledgement must not follow it

    def _result_ttl(self, deadline: float | None, now: float) -> int:
        """Seconds a result is kept: until RESULT_GRACE after its job's deadline, RESULT_TTL at most."""
        if deadline is None or not math.isfinite(deadline):
            return self.result_ttl
        return max(1, min(self.result_ttl, math.floor(deadline - now) + RESULT_GRACE))

    def release(
        self, worker: str, reason: str, count_attempt: bool = True, slot: int = 0, shard: int = 0
    ) -> tuple[int, int]:
        """Return one batch slot's jobs to its shard's head; (requeued, dead-lettered). Idempotent.

        The slot is read first, to declare the result keys the script may answer."""
        keys = self.shards[shard]
        plist = keys.processing(worker, slot)
        raws = retry_once(lambda: self.redis.lrange(plist, 0, -1))
        if not raws:
            return 0, 0
        declared = [plist, keys.queue, keys.dead, *self._result_keys(keys, raws)]
        args = [*self._release_args(keys), worker, int(count_attempt), reason]
        requeued, dead_lettered = retry_once(lambda: self._release(keys=declared, args=args))
        return int(requeued), int(dead_lettered)

    def reap(self, shards: Iterable[int] | None = None) -> tuple[int, int, int]:
        """Release the jobs of every worker whose heartbeat expired, in the given shards (default all);
        (workers, requeued, dead-lettered). Idempotent."""
        totals = [0, 0, 0]
        for keys in self._shards(shards):
            for worker in self._dead_workers(keys):
                totals = [a + b for a, b in zip(totals, self._reap_one(keys, worker), strict=True)]
        workers, requeued, dead_lettered = totals
        return workers, requeued, dead_lettered

    def _reap_one(self, keys: Keys, worker: str) -> list[int]:
        """REAP one dead worker; an error of its own is logged and costs only it this round, so that one
        worker the reaper cannot handle never keeps the others' jobs from coming back."""
        try:
            return self._reap_worker(keys, worker)
        except REDIS_UNAVAILABLE:
            raise  # the shard's server, not this worker: the others would fail the same way
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.error("cannot reap worker %s in shard %d (%s: %s); reaping the others",
                      logger.untrusted(worker), keys.shard, type(exc).__name__, logger.untrusted(exc))  # fmt: skip
            return [0, 0, 0]

    def _dead_workers(self, keys: Keys) -> list[str]:
        """Workers registered in a shard whose heartbeat there has expired."""
        return sorted(worker for worker, beat in retry_once(lambda: self._heartbeats(keys)).items() if beat is None)

    def _reap_worker(self, keys: Keys, worker: str) -> list[int]:
        """Run REAP for one worker of a shard, declaring its slots and the result keys of the jobs in them."""
        answerable = self._result_keys(keys, self.claimed(worker, keys.shard))
        declared = [keys.heartbeat(worker), keys.workers, keys.queue, keys.dead, *keys.processing_lists(worker)]
        declared += answerable
        args = [*self._release_args(keys), worker, SLOTS]
        return [int(n) for n in retry_once(lambda: self._reap(keys=declared, args=args))]

    def _result_keys(self, keys: Keys, raws: list[bytes]) -> list[str]:
        """The result keys of the jobs among `raws` that name their web process and id."""
        metadata = (job_metadata(raw, self.max_job_bytes) for raw in raws)
        return list(dict.fromkeys(keys.result(m["origin"], m["id"]) for m in metadata if "origin" in m and "id" in m))

    def _release_args(self, keys: Keys) -> list[object]:
        """ARGV[1..7] of the release and reap scripts (see scripts.py)."""
        return [
            keys.result_prefix,
            self.max_attempts,
            self.result_ttl,
            RESULT_GRACE,
            self.max_job_bytes,
            self.dead_letter_max,
            time.time(),
        ]


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


def _answers(keys: Keys, dead: list[DeadLetter]) -> list[tuple[str, dict, float | None]]:
    """The error results of the dead letters whose job names its client readably: (key, payload, deadline)."""
    return [(keys.result(*d.reply_to), d.answer(), d.metadata.get("deadline")) for d in dead if d.reply_to]


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


def distinct_models(models: Iterable[dict]) -> list[dict]:
    """Each model once, in a stable order."""
    return [dict(model) for model in sorted({tuple(sorted(m.items())) for m in models})]


def _model_of(heartbeat: bytes) -> tuple[tuple[str, str], ...]:
    """A heartbeat's model as sorted (key, value) pairs (an older worker's "alive": unknown)."""
    try:
        model = json.loads(heartbeat)
    except ValueError:
        model = None
    if not isinstance(model, dict):
        return (("model", "unknown"), ("weights", "unknown"))
    return tuple(sorted((str(k), str(v)) for k, v in model.items()))
