"""Batch claiming: the fill wait is the worker's own, not the Redis server's clock tick."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from imgserve.launch.local_redis import LocalRedis
from imgserve.protocol import Job, connect
from tools.queues import Queues

pytestmark = pytest.mark.unit

PIXELS = np.zeros((224, 224, 3), np.uint8)


def make_job() -> Job:
    return Job.new(PIXELS, "0123456789ab", 30.0)


@pytest.fixture(scope="module")
def slow_tick_redis():
    """A Redis whose clock ticks once a second (hz 1): a blocking command's timeout fires only on a tick."""
    with LocalRedis(extra_args=("--hz", "1")) as server:
        yield server


def test_batch_wait_does_not_depend_on_the_server_clock_tick(slow_tick_redis):
    # A wait done with a blocking Redis command would last until the next tick (up to 1 s here;
    # up to 100 ms at the default hz 10) instead of 20 ms. This checks the wait's bound, not speed.
    queue = Queues.on(connect(slow_tick_redis.url), "tick")
    started = time.monotonic()
    for _ in range(3):
        queue.web.enqueue(make_job(), 100)
        assert len(queue.worker.claim_batch("w", size=4, wait=0.02, block=1)) == 1
        queue.worker.finish_batch("w", [], [])
    assert time.monotonic() - started < 0.9


def test_a_sub_millisecond_wait_does_not_block(slow_tick_redis):
    queue = Queues.on(connect(slow_tick_redis.url), "sub-ms")
    queue.web.enqueue(make_job(), 100)
    assert len(queue.worker.claim_batch("w", size=4, wait=0.0009, block=1)) == 1


def test_jobs_arriving_during_the_wait_join_the_batch(queue):
    queue.web.enqueue(make_job(), 100)
    threading.Timer(0.02, lambda: [queue.web.enqueue(make_job(), 100) for _ in range(2)]).start()
    assert len(queue.worker.claim_batch("w", size=8, wait=0.3, block=1)) == 3


def test_a_full_batch_does_not_wait(queue):
    for _ in range(5):
        queue.web.enqueue(make_job(), 100)
    assert len(queue.worker.claim_batch("w", size=4, wait=30, block=1)) == 4
    assert queue.inspect.depth() == 1


def test_peek_shows_the_head_job_without_claiming_it(queue):
    assert queue.inspect.peek() is None
    first, second = make_job(), make_job()
    queue.web.enqueue(first, 100)
    queue.web.enqueue(second, 100)
    assert Job.from_json(queue.inspect.peek()).id == first.id
    assert queue.inspect.depth() == 2
    [claimed] = queue.worker.claim_batch("w", size=1, wait=0, block=1)
    assert Job.from_json(claimed).id == first.id
