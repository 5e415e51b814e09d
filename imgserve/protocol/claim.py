"""How a worker claims batches from the shards it serves: fairly, blocking where it can, and going on
with the other shards while one cannot be reached; and within a shard, from its priority levels by
weighted fair share (priority.py, PRIORITY_WEIGHTS: one FairShare per shard).

One shard: the claim blocks on it for ROTATE_BLOCK seconds, on the level it took from last. Several: each
claim visits the shards in turn, starting after the one served last, without blocking (so a busy shard
cannot starve the others); when all are empty it blocks on the next one for ROTATE_BLOCK seconds, then
visits them all again. BLMOVE waits on one list only, so the block is short: a job that arrives on another
level or shard waits at most ROTATE_BLOCK for an idle worker. An idle worker thus sends (shards + 1) round
trips of a few O(1) commands per ROTATE_BLOCK and otherwise waits in Redis.

A claim whose reply was lost may have moved jobs into the slot's processing list: that list is released
back to the head of its shard's queue (no attempt counted) before anything is claimed into it again, so
nothing is moved twice and nothing stays stranded. A shard that failed is left alone for a moment
(doubling up to MAX_BACKOFF) while the others are served.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from imgserve import logger

from .backoff import Backoff
from .connection import REDIS_UNAVAILABLE
from .priority import DEFAULT_WEIGHTS, FairShare
from .worker_queue import WorkerQueue

ROTATE_BLOCK = 0.1  # seconds a claim blocks on one level of one shard before visiting the others again
MIN_BACKOFF, MAX_BACKOFF = 0.5, 5.0

log = logger.get(__name__)


class Claimer:
    """Claims one worker's batches over its shards (one thread: the worker's feeder)."""

    def __init__(
        self,
        queue: WorkerQueue,
        worker: str,
        shards: Iterable[int],
        size: int,
        wait: float,
        weights: tuple[int, ...] = DEFAULT_WEIGHTS,
    ) -> None:
        self.queue = queue
        self.worker = worker
        self.shards = list(shards)
        self.size = size
        self.wait = wait
        self._next = 0  # index in `shards` of the one visited first
        self.shares = {shard: FairShare(weights) for shard in self.shards}  # each shard's levels, shared fairly
        self._stranded: set[tuple[int, int]] = set()  # (shard, slot) whose last claim may have moved jobs
        self._backoff: dict[int, Backoff] = {}  # shard -> its backoff, while its claims fail
        self._retry_at: dict[int, float] = {}  # shard -> when to claim from it again
        # Shards the worker has heartbeated in (its heartbeat adds them): only those are claimed from, so
        # that the reaper of a shard knows every worker that holds jobs there.
        self.registered: set[int] = set()

    def claim(self, slot: int) -> tuple[int, list[bytes]]:
        """(shard, jobs) claimed into `slot`; no jobs when every shard stayed empty.

        Raises REDIS_UNAVAILABLE when no shard could be reached (the caller backs off and calls again)."""
        order = self._order()
        if not order:
            raise redis.ConnectionError("the worker is registered in none of its shards yet")
        if len(order) == 1:
            return order[0], self._claim(order[0], slot, ROTATE_BLOCK)
        reachable, error = [], None
        for shard in order:
            try:
                batch = self._claim(shard, slot, 0)
            except REDIS_UNAVAILABLE as exc:
                error = exc
                continue
            if batch:
                return shard, batch
            reachable.append(shard)
        if error and not reachable:
            raise error
        return reachable[0], self._claim(reachable[0], slot, ROTATE_BLOCK)

    def _order(self) -> list[int]:
        """The registered shards from the next in turn, leaving out those backing off (unless all are)."""
        turn = [shard for shard in self.shards[self._next :] + self.shards[: self._next] if shard in self.registered]
        now = time.monotonic()
        ready = [shard for shard in turn if self._retry_at.get(shard, 0.0) <= now]
        return ready or turn

    def _claim(self, shard: int, slot: int, block: float) -> list[bytes]:
        """Claim from one shard, first releasing what a failed claim may have left in the slot."""
        try:
            if (shard, slot) in self._stranded:
                self.queue.release(self.worker, "a claim failed", count_attempt=False, slot=slot, shard=shard)
                self._stranded.discard((shard, slot))
            batch = self.queue.claim_batch(
                self.worker, self.size, self.wait, block, slot, shard, only_into_empty=True, share=self.shares[shard]
            )
        except REDIS_UNAVAILABLE as exc:
            self._stranded.add((shard, slot))
            backoff = self._backoff.setdefault(shard, Backoff(MIN_BACKOFF, MAX_BACKOFF)).next()
            self._retry_at[shard] = time.monotonic() + backoff
            if len(self.shards) > 1:  # with one shard the caller says it, as it backs off
                log.warning("cannot claim from shard %d (%s: %s); serving the others, back in %.1f s",
                            shard, type(exc).__name__, exc, backoff)  # fmt: skip
            raise
        self._backoff.pop(shard, None)
        self._retry_at.pop(shard, None)
        self._next = (self.shards.index(shard) + 1) % len(self.shards)
        return batch
