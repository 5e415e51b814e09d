"""Every Redis key name of the protocol, declared once (`{q}` is IMAGE_QUEUE, default `image_queue`).

{q}                               LIST    pending jobs (JSON). The web server LPUSHes; workers take from
                                          the right, so the list is FIFO and its right end is the head.
{q}:processing:{worker}:{slot}    LIST    one claimed batch of one worker, until it is acknowledged.
                                          A worker has SLOTS batch slots; a serial worker uses slot 0.
{q}:heartbeat:{worker}            STRING  the worker's model, as JSON ({"model", "weights"}); TTL
                                          HEARTBEAT_TTL, renewed by the worker.
{q}:workers                       SET     ids of workers that may own processing lists.
{q}:dead                          LIST    dead letters, newest first, at most DEAD_LETTER_MAX:
                                          {"reason", "worker", "at", "job": metadata}, never the image.
{q}:result:{origin}:{id}          STRING  result JSON for job `id` sent by web process `origin`; expires
                                          a few seconds after the job's deadline (RESULT_TTL at most).
                                          Submitted jobs (POST /jobs) have the origin SUBMITTED, so that
                                          any web process finds their results.
{q}:ticket:{id}                   STRING  a submitted job's status until it has a result: "queued", then
                                          "running" once a worker took it; deleted when it is cancelled.
                                          TTL RESULT_TTL plus a few seconds.
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


class Keys:
    """The key names of one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.workers = f"{queue}:workers"
        self.dead = f"{queue}:dead"
        self.processing_prefix = f"{queue}:processing:"
        self.heartbeat_prefix = f"{queue}:heartbeat:"
        self.result_prefix = f"{queue}:result:"
        self.ticket_prefix = f"{queue}:ticket:"

    def processing(self, worker: str, slot: int = 0) -> str:
        """The processing list of one of a worker's batch slots."""
        return f"{self.processing_prefix}{worker}:{slot}"

    def processing_lists(self, worker: str) -> list[str]:
        """Every processing list a worker may own."""
        return [self.processing(worker, slot) for slot in range(SLOTS)]

    def heartbeat(self, worker: str) -> str:
        return self.heartbeat_prefix + worker

    def result(self, origin: str, job_id: str) -> str:
        return f"{self.result_prefix}{origin}:{job_id}"

    def ticket(self, job_id: str) -> str:
        return self.ticket_prefix + job_id

    def result_channel_pattern(self, db: int, origin: str) -> str:
        """The keyspace-notification channels of every result key of one web process."""
        return f"__keyspace@{db}__:{self.result_prefix}{origin}:*"
