"""A stand-in for the web app's queue, for in-process tests of the web API through Flask's test client."""

from __future__ import annotations

import redis

from imgserve.protocol.keys import OPEN_OWNER

MODEL = {"model": "stand-in", "weights": "none"}


class StandInQueue:
    """Answers as WebQueue and QueueInspector would: `accept` False is a full queue; `down` raises as an
    unreachable Redis."""

    def __init__(self, accept: bool = True, down: bool = False) -> None:
        self.accept, self.down = accept, down
        self.enqueued: list = []
        self.held: dict[str, set[str]] = {}

    def enqueue_many(self, jobs: list, max_queue: int) -> bool:
        if self.down:
            raise redis.ConnectionError("Connection refused")
        self.enqueued.extend(jobs)
        return self.accept

    def submit(self, job, max_queue: int) -> bool:
        return self.enqueue_many([job], max_queue)

    def job_status(self, job_id: str, owner: str = OPEN_OWNER) -> dict | None:
        mine = any(job.id == job_id and (job.owner or OPEN_OWNER) == owner for job in self.enqueued)
        return {"status": "queued"} if mine else None

    def cancel_submitted(self, job_id: str, owner: str = OPEN_OWNER) -> int:
        return 1 if self.job_status(job_id, owner) else -1

    def hold(self, owner: str, jobs: list, limit: int) -> bool:
        self.held.setdefault(owner, set())
        if len(self.held[owner]) + len(jobs) > limit:
            return False
        self.held[owner] |= {job.id for job in jobs}
        return True

    def release_hold(self, owner: str, job_ids: list[str]) -> None:
        self.held.get(owner, set()).difference_update(job_ids)

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict:
        return {"success": True, "predictions": [{"label": "castle", "probability": 0.5}], **MODEL}

    def live_worker_models(self) -> dict[str, dict]:
        return {"worker-1": MODEL}

    def depth(self) -> int:
        if self.down:  # redis-py names the address it could not reach
            raise redis.ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")
        return len(self.enqueued)

    def depths(self) -> list[int]:
        return [self.depth()]

    def level_depths(self) -> list[dict[str, int]]:
        return [{"high": 0, "normal": self.depth(), "low": 0}]

    def dead_letter_count(self) -> int:
        return 0

    def dead_letter_counts(self) -> list[int]:
        return [0]

    def oldest_job_ages(self) -> list[float]:
        return [0.0]
