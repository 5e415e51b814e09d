"""Recovery at the default liveness settings (HEARTBEAT_TTL, REAP_INTERVAL): a crashed worker's jobs are back
in the queue within 3 s, and a live worker whose model keeps every core busy is never taken for dead.

Real model workers (ResNet50, random weights, on the CPU) against a real Redis; no web server is needed, so
the tests queue jobs themselves. One worker, the survivor, is shared by the module.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from imgserve.launch.local_redis import free_port
from imgserve.protocol import Job, connect
from imgserve.settings import Settings
from tests.support.freezing import freeze_holding_jobs
from tests.support.metrics import metric
from tools.processes import server_env, start_worker, wait_until
from tools.queues import Queues

pytestmark = pytest.mark.system

RECOVERY_GOAL = 3.0  # seconds from a worker's last heartbeat to its jobs back in the queue (issue 16)
BATCH = 32


@pytest.fixture(scope="module")
def survivor(redis_server):
    """A worker at the default liveness settings with BATCH_SIZE 32, and a client of its queue."""
    defaults = Settings()
    assert defaults.heartbeat_ttl + defaults.reap_interval <= RECOVERY_GOAL, "the defaults cannot meet the goal"
    env = server_env(redis_server.url, f"rec-{uuid.uuid4().hex[:6]}", BATCH_SIZE=BATCH, METRICS_PORT=free_port())
    worker = start_worker(env)
    queue = Queues.on(connect(redis_server.url), env["IMAGE_QUEUE"])
    yield worker, queue
    worker.stop()
    queue.redis.close()


def queue_jobs(queue: Queues, count: int) -> list[Job]:
    """`count` jobs, due in 5 minutes, queued as the web server queues them (blank images: the model's time
    does not depend on the pixels, and blank ones compress to almost nothing in Redis)."""
    jobs = [Job.new(np.zeros((224, 224, 3), np.uint8), "00000000ec0e", 300, "zstd2") for _ in range(count)]
    for job in jobs:
        assert queue.web.enqueue(job, max_queue=10_000)
    return jobs


def published(queue: Queues, jobs: list[Job]) -> int:
    return int(queue.redis.exists(*(queue.keys.result(job.origin, job.id) for job in jobs)))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StrictReaper(threading.Thread):
    """Runs the reaper every 50 ms, far more often than any worker does, and watches the heartbeat's TTL."""

    def __init__(self, queue: Queues, worker: str) -> None:
        super().__init__(daemon=True)
        self.queue, self.worker = queue, worker
        self.reaped = 0
        self.lowest_ttl_ms = float("inf")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.lowest_ttl_ms = min(self.lowest_ttl_ms, self.queue.redis.pttl(self.queue.keys.heartbeat(self.worker)))
            self.reaped += self.queue.worker.reap()[0]


def batch_counts(port: int) -> dict[str, float]:
    """The worker's own counts (its Prometheus endpoint): batches of 17 to 32 jobs, batches whose model time
    was at most 0.25 s, all batches and their model time."""
    sample = functools.partial(metric, port)
    return {
        "of_32": sample("worker_batch_size_bucket", le="32.0") - sample("worker_batch_size_bucket", le="16.0"),
        "quick": sample("worker_inference_seconds_bucket", le="0.25"),
        "batches": sample("worker_inference_seconds_count"),
        "seconds": sample("worker_inference_seconds_sum"),
        "requeued": sample("worker_jobs_total", outcome="requeued"),
    }


def test_a_worker_running_cpu_batches_of_32_on_every_core_is_never_reaped(survivor):
    worker, queue = survivor
    port = int(worker.env["METRICS_PORT"])
    before = batch_counts(port)
    jobs = queue_jobs(queue, 10 * BATCH)  # 10 s of model time or more on 2 cores
    reaper = StrictReaper(queue, worker.id)
    reaper.start()
    cpu_before, started = cpu_seconds(worker.process.pid), time.monotonic()
    try:
        wait_until(lambda: published(queue, jobs) == len(jobs), 240, "every job's result", interval=0.2)
    finally:
        reaper.stop.set()
        reaper.join(5)
    seconds = time.monotonic() - started
    cores = (cpu_seconds(worker.process.pid) - cpu_before) / seconds  # reported: other processes share the cores
    counted = {name: value - before[name] for name, value in batch_counts(port).items()}
    assert counted["of_32"] >= 8, f"full CPU batches of the real model: {counted}"
    # Any batch quicker than 0.25 s was one of the small ones (a tail), not a batch of 32: real model time.
    assert counted["quick"] <= counted["batches"] - counted["of_32"], counted
    assert reaper.reaped == 0, "a live worker was reaped"
    assert reaper.lowest_ttl_ms > 0, "the heartbeat expired while the worker was alive"
    assert counted["requeued"] == 0, "nothing was requeued"
    print(
        f"{counted['batches']:.0f} batches in {seconds:.1f} s ({1000 * counted['seconds'] / counted['batches']:.0f} ms "
        f"each on average), {cores:.2f} cores busy; heartbeat TTL never below {reaper.lowest_ttl_ms} ms"
    )


def test_a_crashed_workers_jobs_are_back_in_the_queue_within_3_s(survivor):
    worker, queue = survivor
    victim = start_worker(dict(worker.env, METRICS_PORT="0"))
    try:
        jobs = queue_jobs(queue, 4 * BATCH)
        held = freeze_holding_jobs(victim, queue)  # its heartbeat stops here: the crash, for the reaper
        frozen_at = time.monotonic()
        victim.process.kill()
        victim.process.wait(30)
        wait_until(lambda: not queue.inspect.claimed(victim.id), 10, "the dead worker's jobs back in the queue", 0.01)
        recovered_after = time.monotonic() - frozen_at
        assert not queue.redis.sismember(queue.keys.workers, victim.id)
        wait_until(lambda: published(queue, held) == len(held), 120, "the dead worker's jobs answered", 0.2)
        wait_until(lambda: published(queue, jobs) == len(jobs), 120, "every job answered", 0.2)
    finally:
        if victim.process.poll() is None:
            os.kill(victim.process.pid, signal.SIGKILL)
        victim.stop()
    assert recovered_after <= RECOVERY_GOAL, f"{len(held)} jobs back after {recovered_after:.2f} s"
    print(f"{len(held)} jobs of the killed worker back in the queue {recovered_after:.2f} s after its last heartbeat")
