"""The worker side of the queue: what a worker does with it. It heartbeats in the shards it serves,
claims batches into its batch slots, marks submitted jobs running, publishes results and acknowledges
them, releases a batch it cannot finish, and reaps the workers whose heartbeat expired."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from imgserve import logger

from . import scripts
from .connection import REDIS_UNAVAILABLE, Client, retry_once
from .job import DeadLetter, Job, job_metadata, unanswerable
from .keys import SLOTS, SUBMITTED, Keys, models_key, ticket_key, ticket_value
from .priority import PRIORITIES, FairShare
from .queue import RESULT_GRACE, QueueBase

log = logger.get(__name__)


class WorkerQueue(QueueBase):
    """A worker's operations on the queue, each on one shard (or on each of the shards it names)."""

    def __init__(self, client: Client, queue: str, *limits: int, **named_limits: int) -> None:
        """`limits` as QueueBase takes them (result_ttl, max_attempts, ..., shards)."""
        super().__init__(client, queue, *limits, **named_limits)
        self._ack = client.register_script(scripts.ACK)
        self._reap = client.register_script(scripts.REAP)
        self._release = client.register_script(scripts.RELEASE)

    def heartbeat(
        self, worker: str, ttl: float, shards: Iterable[int] | None = None, model: dict | None = None
    ) -> None:
        """Renew the heartbeat (its value: `model`, the model's card), then (re)join the worker set, in one round
        trip per shard; then name the queue's model in the registry of models. Idempotent.

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
        retry_once(lambda: self.redis.sadd(models_key(self.base), self.model))

    def unregister(self, worker: str, shards: Iterable[int] | None = None) -> None:
        """Clean exit: return anything still claimed to the queue (no attempt counted), then leave."""
        for keys in self._shards(shards):
            for slot in range(SLOTS):
                self.release(worker, "worker shut down", count_attempt=False, slot=slot, shard=keys.shard)
            retry_once(lambda keys=keys: self.redis.delete(keys.heartbeat(worker)))
            retry_once(lambda keys=keys: self.redis.srem(keys.workers, worker))

    def claim_batch(
        self,
        worker: str,
        size: int,
        wait: float,
        block: float,
        slot: int = 0,
        shard: int = 0,
        only_into_empty: bool = False,
        share: FairShare | None = None,
    ) -> list[bytes]:
        """Move up to `size` jobs from a shard's heads into one of this worker's batch slots in that shard.

        Reads how many jobs wait at each priority level and takes them from the levels `share` chooses (the
        weighted fair share, priority.py; a batch may mix levels), one LMOVE per job: each moves one job
        atomically, so concurrent workers never share a job, and no job is copied through Lua. When every level
        is empty, blocks up to `block` seconds (not at all when 0) on the level `share` took from last, learning
        in the same round trip how many wait at each level, and takes those. If the batch is not full, sleeps
        until `wait` seconds after the first job and takes what arrived meanwhile.

        The moves are not idempotent, so nothing resends them: after a failed claim the caller releases
        the slot (its jobs back to their levels' heads) before claiming into it again.

        `only_into_empty` (a worker's claims): acknowledging a batch deletes its whole slot, so a batch must
        never join jobs left in the slot by one that was not acknowledged. The first round trip reads the
        slot's length too; if it held jobs, the slot is released and nothing is claimed this time.
        """
        keys, share = self.shards[shard], share or FairShare()
        plist = keys.processing(worker, slot)
        with self.redis.pipeline(transaction=False) as pipe:
            if only_into_empty:
                pipe.llen(plist)
            *held, waiting = self._waiting(keys, pipe)
        if held and held[0]:
            log.error(
                "batch slot %d of shard %d still held %d job(s) when claimed into; releasing it", slot, shard, held[0]
            )
            self.release(worker, "left in a batch slot that was claimed into again", slot=slot, shard=shard)
            return []
        until = time.monotonic() + wait
        batch = self._move(keys, plist, share.plan(waiting, size))
        if not batch:
            batch = self._block(keys, plist, share, block, size)
            until = time.monotonic() + wait
        if not batch:
            return []
        remaining = until - time.monotonic()
        if len(batch) < size and remaining > 0:
            # The wait is client-side: Redis times a blocking command out only on its clock tick
            # (100 ms at the default hz 10), and Redis 6 blocks forever on a timeout under 1 ms.
            time.sleep(remaining)
            with self.redis.pipeline(transaction=False) as pipe:
                [waiting] = self._waiting(keys, pipe)
            batch += self._move(keys, plist, share.plan(waiting, size - len(batch)))
        return batch

    @staticmethod
    def _waiting(keys: Keys, pipe) -> list:
        """Execute `pipe` with the LLEN of every level appended; its replies, the last one {level: jobs waiting}."""
        for name in keys.levels.values():
            pipe.llen(name)
        replies = pipe.execute()
        counts = replies[-len(PRIORITIES) :]
        return [*replies[: -len(PRIORITIES)], dict(zip(keys.levels, counts, strict=True))]

    def _block(self, keys: Keys, plist: str, share: FairShare, block: float, size: int) -> list[bytes]:
        """Block up to `block` s for a job on the level `share` took from last; that job and the next ones."""
        if block <= 0:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.blmove(keys.level(share.last), plist, block, "RIGHT", "RIGHT")
            first, waiting = self._waiting(keys, pipe)
        if first is None:
            return []
        share.took(share.last)
        return [first, *self._move(keys, plist, share.plan(waiting, size - 1))]

    def _move(self, keys: Keys, plist: str, levels: list[str]) -> list[bytes]:
        """Move one job from the head of each level in `levels` to the end of `plist`, in one round trip."""
        if not levels:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for level in levels:
                pipe.lmove(keys.level(level), plist, "RIGHT", "RIGHT")
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
                    ticket = ticket_value("running", shard, owner, self.model)
                    pipe.set(ticket_key(self.base, job_id), ticket, xx=True, get=True, keepttl=True)
                return pipe.execute()

        return {job_id for (job_id, _), old in zip(submitted, retry_once(take), strict=True) if old is None}

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
        declared = [plist, *keys.levels.values(), keys.dead, *self._result_keys(keys, raws)]
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
        declared = [keys.heartbeat(worker), keys.workers, *keys.levels.values(), keys.dead]
        declared += keys.processing_lists(worker)
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


def _answers(keys: Keys, dead: list[DeadLetter]) -> list[tuple[str, dict, float | None]]:
    """The error results of the dead letters whose job names its client readably: (key, payload, deadline)."""
    return [(keys.result(*d.reply_to), d.answer(), d.metadata.get("deadline")) for d in dead if d.reply_to]
