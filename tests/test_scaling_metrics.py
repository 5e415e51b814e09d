"""The metrics that scaling reads (README "Scaling workers"): queue wait, jobs in flight and the queue:compute
ratio from the worker, per model and shard; the oldest job's age from the web's scrape-time collector."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from imgserve.protocol import Job
from imgserve.web.metrics import QueueDepthCollector
from tests.support.workers import RunningWorker, worker_config
from tools.processes import wait_until

pytestmark = pytest.mark.unit

MODEL = {"model": "scaling-test-model", "weights": "none"}
LABELS = {"model": MODEL["model"], "shard": "0"}


class FixedClassifier:
    """Stands in for the model: the same answer for every image, under a model name of the test's own; each
    batch waits until `gate` is set (it is, unless a test clears it)."""

    identity = MODEL

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def classify(self, images: np.ndarray, k: int = 5) -> list[list[dict]]:
        assert self.gate.wait(30), "the test never let the batch through"
        return [[{"label": "castle", "probability": 1.0}] * k for _ in images]


def job_enqueued_ago(seconds: float) -> Job:
    job = Job.new(np.zeros((224, 224, 3), np.uint8), "000000005ca1", 600)
    job.enqueued_at -= seconds
    return job


def sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels if labels is not None else LABELS) or 0.0


@pytest.fixture
def model() -> FixedClassifier:
    return FixedClassifier()


@pytest.fixture
def serve(redis_server, queue, model):
    """serve(jobs): queue the jobs, run a Worker (through run()) until every one is answered, stop it."""

    def run(jobs: list[Job]) -> None:
        for job in jobs:
            assert queue.web.enqueue(job, max_queue=100)
        with RunningWorker(worker_config(redis_server.url, queue.name), model):
            wait_until(lambda: all(answered(queue, job) for job in jobs), 30, "every job answered")

    return run


def answered(queue, job: Job) -> bool:
    return queue.redis.exists(queue.keys.result(job.origin, job.id)) == 1


def test_queue_wait_is_observed_per_job_from_enqueue_to_claim(serve):
    count, total = sample("worker_queue_wait_seconds_count"), sample("worker_queue_wait_seconds_sum")
    serve([job_enqueued_ago(20), job_enqueued_ago(40)])
    assert sample("worker_queue_wait_seconds_count") == count + 2
    waited = sample("worker_queue_wait_seconds_sum") - total
    assert 60 <= waited < 60 + 2 * 60  # at least the backdating; the rest is this test's own run time


def test_jobs_are_in_flight_from_claim_until_published(redis_server, queue, model):
    before = sample("worker_jobs_in_flight")
    jobs = [job_enqueued_ago(0) for _ in range(3)]
    for job in jobs:
        assert queue.web.enqueue(job, max_queue=100)
    model.gate.clear()
    with RunningWorker(worker_config(redis_server.url, queue.name), model):
        wait_until(lambda: sample("worker_jobs_in_flight") == before + 3, 30, "three jobs in flight")
        model.gate.set()
        wait_until(lambda: all(answered(queue, job) for job in jobs), 30, "every job answered")
        wait_until(lambda: sample("worker_jobs_in_flight") == before, 10, "none in flight once published")


def test_queue_compute_ratio_is_the_mean_wait_over_the_model_time(serve):
    waited = sample("worker_queue_wait_seconds_sum")
    computed = REGISTRY.get_sample_value("worker_inference_seconds_sum") or 0.0
    serve([job_enqueued_ago(30), job_enqueued_ago(10)])  # queued before the worker starts: one batch
    mean_wait = (sample("worker_queue_wait_seconds_sum") - waited) / 2
    model_time = REGISTRY.get_sample_value("worker_inference_seconds_sum") - computed
    assert sample("worker_queue_compute_ratio") == pytest.approx(mean_wait / max(model_time, 1e-6), rel=1e-6)
    assert sample("worker_queue_compute_ratio") > 1  # 20 s of waiting against a model that answers at once


def test_oldest_job_age_is_read_from_the_head_of_each_shard(queue):
    now = time.time()
    assert queue.inspect.oldest_job_ages(now) == [0.0]  # an empty queue is not late
    for age in (90, 30, 5):  # the first enqueued is the next claimed
        assert queue.web.enqueue(job_enqueued_ago(age), max_queue=100)
    assert queue.inspect.oldest_job_ages(now)[0] == pytest.approx(90, abs=5)
    families = {family.name: family for family in QueueDepthCollector(queue.inspect).collect()}
    assert families["web_oldest_job_age_seconds"].samples[0].value >= 90
    shard_sample = families["web_shard_oldest_job_age_seconds"].samples[0]
    assert shard_sample.labels == {"shard": "0"} and shard_sample.value >= 90
