"""The web side of the queue: what a web process does with it. It spreads jobs over the shards (or
queues a submitted job with its ticket), counts each API key's share, takes results, and cancels a job no
worker has taken yet."""

from __future__ import annotations

import itertools
import math
import random
import re
import time

from imgserve import logger

from . import scripts
from .connection import REPLY_LOST, Client, retry_once
from .job import Job
from .keys import BASE_MODEL, OPEN_OWNER, SUBMITTED, Keys, owner_key, ticket_key, ticket_value
from .priority import DEFAULT_PRIORITY
from .queue import QueueBase, read_result

TICKET_STATUSES = ("queued", "running")
# A result the web server took lives this long more, so that reading it again after a lost reply
# finds it still there.
TAKEN_RESULT_TTL_MS = 2000

log = logger.get(__name__)
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as models.py names them: safe inside a key


class WebQueue(QueueBase):
    """A web process's operations on the queue."""

    def __init__(self, client: Client, queue: str, *limits: int, **named_limits: int) -> None:
        """`limits` as QueueBase takes them (result_ttl, max_attempts, ..., shards)."""
        super().__init__(client, queue, *limits, **named_limits)
        self._turn = itertools.count(random.randrange(len(self.shards)))  # where this process starts spreading jobs
        self._cancel = client.register_script(scripts.CANCEL)
        self._hold = client.register_script(scripts.HOLD)

    def enqueue(self, job: Job, max_queue: int) -> bool:
        """Push a job to the next shard in turn, or the next that is not full (enqueue_many)."""
        return self.enqueue_many([job], max_queue)

    def enqueue_many(self, jobs: list[Job], max_queue: int) -> bool:
        """Push jobs (all of one priority level) in one command to their level's list in one shard, first job
        first in line, so that a worker can run them in one batch: the next shard in turn, or the next that has
        room for them; False (and nothing queued) when none has, each shard's level holding its share of
        `max_queue`. Sets each job's `shard`.

        A shard that cannot be reached raises REDIS_UNAVAILABLE: its jobs may be queued there, so they are
        not pushed to another shard as well.
        """
        raws, count = [job.to_json() for job in jobs], len(self.shards)
        limit = math.ceil(max_queue / count)
        first = next(self._turn)
        for shard in ((first + i) % count for i in range(count)):
            if self._push(self.shards[shard], raws, limit, jobs[0].priority):
                for job in jobs:
                    job.shard = shard
                return True
        return False

    def _push(self, keys: Keys, raws: list[bytes], limit: int, priority: str = DEFAULT_PRIORITY) -> bool:
        """LPUSH to one level of one shard; False (and nothing left queued) when that took it past `limit` jobs.

        LPUSH is not idempotent, so after a lost reply the jobs are pushed again in a transaction that
        first removes the copies the lost LPUSH may have queued.
        """
        queue = keys.level(priority)
        try:
            depth = self.redis.lpush(queue, *raws)
        except REPLY_LOST:
            with self.redis.pipeline(transaction=True) as pipe:
                for raw in raws:
                    pipe.lrem(queue, 1, raw)
                pipe.lpush(queue, *raws)
                depth = pipe.execute()[-1]
        if depth <= limit:
            return True
        # Over the limit: take them back. One a worker claimed meanwhile runs (a lone job is then accepted
        # after all; among several, its result expires unread).
        withdrawn = [self._withdraw(keys, raw, priority) for raw in raws]
        return len(raws) == 1 and not withdrawn[0]

    def submit(self, job: Job, max_queue: int) -> bool:
        """Queue a submitted job (origin SUBMITTED) with its ticket; False (nothing queued) when the queue is full.

        The ticket is written first, so that a worker which claims the job at once finds it; it names the
        shard the job goes to, so that any web process finds the result.
        """
        ticket, ttl = ticket_key(self.base, job.id), self._result_ttl(job.deadline, time.time())
        limit = math.ceil(max_queue / len(self.shards))
        shard = self._next_with_room(limit, job.priority)
        if shard is None:
            return False
        value = ticket_value("queued", shard, job.owner, self.model)
        retry_once(lambda: self.redis.set(ticket, value, ex=ttl))
        if self._push(self.shards[shard], [job.to_json()], limit, job.priority):
            job.shard = shard
            return True
        retry_once(lambda: self.redis.delete(ticket))
        return False

    def _next_with_room(self, limit: int, priority: str) -> int | None:
        """The next shard in turn whose `priority` level holds fewer than `limit` jobs; None when all are full."""
        count = len(self.shards)
        first = next(self._turn)
        for shard in ((first + i) % count for i in range(count)):
            if retry_once(lambda shard=shard: self.redis.llen(self.shards[shard].level(priority))) < limit:
                return shard
        return None

    def job_status(self, job_id: str, owner: str = OPEN_OWNER) -> dict | None:
        """A submitted job's status as `owner` may see it: {"status": "done", ...its result} or {"status":
        "failed", "error"} once it has a result, else {"status": "queued" | "running"}; None when `owner` knows
        no such job (never, expired, cancelled, another owner's, or an unreadable ticket)."""
        raw = retry_once(lambda: self.redis.get(ticket_key(self.base, job_id)))
        ticket = None if raw is None else self._read_ticket(job_id, raw)
        if ticket is None or ticket[2] != owner:
            return None
        status, shard, _, model = ticket
        result = retry_once(lambda: self.redis.get(self.shards_of(model)[shard].result(SUBMITTED, job_id)))
        if result is None:
            return {"status": status}
        answer = read_result(result, job_id)
        if not answer["success"]:
            return {"status": "failed", "error": answer["error"]}
        return {"status": "done", **{k: v for k, v in answer.items() if k not in ("success", "status", "id")}}

    def _read_ticket(self, job_id: str, raw: bytes) -> tuple[str, int, str, str] | None:
        """A ticket's (status, shard, owner, model); None (logged) for one no web process wrote."""
        words = raw.decode("utf-8", "replace").split(" ")
        if len(words) == 3:
            words.append(BASE_MODEL)
        if len(words) == 4 and words[0] in TICKET_STATUSES and words[1].isascii() and words[1].isdigit():
            if int(words[1]) < len(self.shards) and MODEL_NAME.fullmatch(words[3]):
                return words[0], int(words[1]), words[2], words[3]
        log.warning("job %s: unreadable ticket %s", logger.untrusted(job_id), logger.untrusted(raw))
        return None

    def cancel_submitted(self, job_id: str, owner: str = OPEN_OWNER) -> int:
        """Cancel `owner`'s submitted job that no worker has taken: 1 done, 0 a worker has it, -1 `owner` knows
        no such job (CANCEL)."""
        return int(retry_once(lambda: self._cancel(keys=[ticket_key(self.base, job_id)], args=[owner])))

    def hold(self, owner: str, jobs: list[Job], limit: int) -> bool:
        """Count `jobs` against `owner`'s share of the queue (HOLD); False (nothing counted) when they would
        take it past `limit`. Each is counted until `release_hold`, or its deadline at the latest.

        A refusal releases the ids: a HOLD replayed after a lost reply finds its own first run's ids counted
        and refuses, and they would otherwise stay counted until their deadline (the ids are fresh, so none
        is anyone else's)."""
        ids = [job.id for job in jobs]
        args = [time.time(), limit, max(job.deadline for job in jobs), *ids]
        held = bool(retry_once(lambda: self._hold(keys=[owner_key(self.base, owner)], args=args)))
        if not held:
            self.release_hold(owner, ids)
        return held

    def release_hold(self, owner: str, job_ids: list[str]) -> None:
        """Stop counting jobs against `owner`'s share: answered, collected, cancelled or refused. Idempotent."""
        retry_once(lambda: self.redis.zrem(owner_key(self.base, owner), *job_ids))

    def cancel(self, job: Job) -> bool:
        """Take a job out of its shard's queue if no worker has claimed it yet; True if it was still queued.

        Idempotent. A job already claimed cannot be taken back: once its deadline has passed, the
        worker drops it instead of running it.
        """
        return self._withdraw(self.shards[job.shard], job.to_json(), job.priority)

    def _withdraw(self, keys: Keys, raw: bytes, priority: str = DEFAULT_PRIORITY) -> bool:
        return retry_once(lambda: self.redis.lrem(keys.level(priority), 1, raw)) == 1

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict | None:
        """A job's result, or None if it is not there yet. The key then expires within seconds.

        GETEX rather than GETDEL: read twice (a retry after a lost reply), it answers the same.
        """
        key = self.shards[shard].result(origin, job_id)
        raw = retry_once(lambda: self.redis.getex(key, px=TAKEN_RESULT_TTL_MS))
        return None if raw is None else read_result(raw, job_id)
