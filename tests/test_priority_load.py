"""Priorities under load, with the project's Worker on a thread and a model that takes a fixed time per batch:
against a 500-job low backlog, a high job runs within the next batches, and a flood of high never stops low.

Nothing here is timed: latency is counted in batches (which batch ran a job, against which had started when it
was queued), and shares in jobs."""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import pytest

from tests.support.workers import NumberedModel, RunningWorker, numbered_job, worker_config
from tools.queues import Queues

pytestmark = pytest.mark.system

BATCH = 4
BATCH_SECONDS = 0.02
LOW, HIGH = range(500), range(1000, 1200)


class SteadyModel(NumberedModel):
    """A NumberedModel that takes BATCH_SECONDS per batch and remembers each batch's jobs in order."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def classify(self, images: np.ndarray, k: int = 5) -> list[list[dict]]:
        time.sleep(BATCH_SECONDS)
        answers = super().classify(images, k)
        with self.lock:
            self.batches.append([int(a[0]["label"].removeprefix("image-")) for a in answers])
        return answers

    def batch_of(self, number: int) -> int | None:
        with self.lock:
            return next((i for i, batch in enumerate(self.batches) if number in batch), None)


def queued(queue: Queues, numbers: range | list[int], priority: str) -> None:
    jobs = []
    for n in numbers:
        job = numbered_job(n, timeout=300)
        job.priority = priority
        jobs.append(job)
    for start in range(0, len(jobs), 50):
        assert queue.web.enqueue_many(jobs[start : start + 50], 10_000)


def wait_until(condition, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the worker stopped making progress"
        time.sleep(0.005)


@pytest.fixture
def running(redis_server, queue_name):
    config = worker_config(redis_server.url, queue_name, BATCH_SIZE=BATCH, PREFETCH_BATCHES=0)
    model = SteadyModel()
    queue = Queues.from_settings(config)
    queued(queue, LOW, "low")
    with RunningWorker(config, model):
        yield queue, model


def test_a_high_job_runs_within_two_batches_against_a_low_backlog(running):
    queue, model = running
    after = []  # per high job: how many batches started after it was queued, up to the one that ran it
    for n in range(1000, 1020):
        with model.lock:
            started = len(model.batches) + 1  # the batch running now (not yet recorded) started before it
        queued(queue, [n], "high")
        wait_until(lambda n=n: model.batch_of(n) is not None)
        after.append(model.batch_of(n) + 1 - started)
    assert statistics.median(after) <= 2, after
    assert queue.inspect.level_depths()[0]["low"] > 0, "the backlog still waits: high did not merely come last"


def test_a_flood_of_high_leaves_low_at_least_its_share(running):
    queue, model = running
    wait_until(lambda: len(model.batches) >= 2)
    queued(queue, HIGH, "high")
    wait_until(lambda: all(model.batch_of(n) is not None for n in HIGH))
    with model.lock:
        first = min(i for i, batch in enumerate(model.batches) if any(n in HIGH for n in batch))
        last = max(i for i, batch in enumerate(model.batches) if any(n in HIGH for n in batch))
        window = [n for batch in model.batches[first : last + 1] for n in batch]
    lows = sum(1 for n in window if n in LOW)
    # PRIORITY_WEIGHTS 8,4,1 with high and low waiting: low takes 1 job in 9, high the rest.
    assert lows >= len(window) // 9 - 1 and lows > 0, (lows, len(window))
    assert lows <= len(window) // 9 + BATCH, "high took most of the worker meanwhile"
    assert queue.inspect.level_depths()[0]["low"] > 0
