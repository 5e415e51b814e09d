"""The metrics that scaling reads (README "Scaling workers"): queue wait, jobs in flight and the queue:compute
ratio from the worker, per model and shard; the oldest job's age from the web's scrape-time collector."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from imgserve import settings
from imgserve.protocol import Job, JobQueue
from imgserve.web.metrics import QueueDepthCollector, oldest_job_ages
from imgserve.worker import pipeline

pytestmark = pytest.mark.unit

MODEL = {"model": "scaling-test-model", "weights": "none"}
LABELS = {"model": MODEL["model"], "shard": "0"}


class FixedClassifier:
    """Stands in for the model: the same answer for every image, under a model name of the test's own."""

    identity = MODEL

    def classify(self, images: np.ndarray, k: int = 5) -> list[list[dict]]:
        return [[{"label": "castle", "probability": 1.0}] * k for _ in images]


def job_enqueued_ago(seconds: float) -> Job:
    job = Job.new(np.zeros((224, 224, 3), np.uint8), "000000005ca1", 600)
    job.enqueued_at -= seconds
    return job


def sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels if labels is not None else LABELS) or 0.0


@pytest.fixture
def worker(queue: JobQueue) -> pipeline.Worker:
    return pipeline.Worker(settings.load(env={}), queue, FixedClassifier())


def claim(queue: JobQueue, worker: pipeline.Worker, jobs: list[Job]) -> list[bytes]:
    for job in jobs:
        assert queue.enqueue(job, max_queue=100)
    raws = queue.claim_batch(worker.id, size=len(jobs), wait=0, block=1)
    assert len(raws) == len(jobs)
    return raws


def test_queue_wait_is_observed_per_job_from_enqueue_to_claim(queue, worker):
    count, total = sample("worker_queue_wait_seconds_count"), sample("worker_queue_wait_seconds_sum")
    raws = claim(queue, worker, [job_enqueued_ago(20), job_enqueued_ago(40)])
    worker.process(raws)
    assert sample("worker_queue_wait_seconds_count") == count + 2
    waited = sample("worker_queue_wait_seconds_sum") - total
    assert 60 <= waited < 60 + 2 * 60  # at least the backdating; the rest is this test's own run time


def test_jobs_are_in_flight_from_claim_until_published(queue, worker):
    before = sample("worker_jobs_in_flight")
    batch = worker._decode(0, claim(queue, worker, [job_enqueued_ago(0) for _ in range(3)]))
    assert sample("worker_jobs_in_flight") == before + 3
    worker._publish(worker._infer(batch))
    assert sample("worker_jobs_in_flight") == before


def test_queue_compute_ratio_is_the_mean_wait_over_the_model_time(queue, worker):
    waited = sample("worker_queue_wait_seconds_sum")
    computed = REGISTRY.get_sample_value("worker_inference_seconds_sum") or 0.0
    worker.process(claim(queue, worker, [job_enqueued_ago(30), job_enqueued_ago(10)]))
    mean_wait = (sample("worker_queue_wait_seconds_sum") - waited) / 2
    model_time = REGISTRY.get_sample_value("worker_inference_seconds_sum") - computed
    assert sample("worker_queue_compute_ratio") == pytest.approx(mean_wait / max(model_time, 1e-6), rel=1e-6)
    assert sample("worker_queue_compute_ratio") > 1  # 20 s of waiting against a model that answers at once


def test_oldest_job_age_is_read_from_the_head_of_each_shard(queue):
    now = time.time()
    assert oldest_job_ages(queue, now) == [0.0]  # an empty queue is not late
    for age in (90, 30, 5):  # the first enqueued is the next claimed
        assert queue.enqueue(job_enqueued_ago(age), max_queue=100)
    assert oldest_job_ages(queue, now)[0] == pytest.approx(90, abs=5)
    families = {family.name: family for family in QueueDepthCollector(queue).collect()}
    assert families["web_oldest_job_age_seconds"].samples[0].value >= 90
    shard_sample = families["web_shard_oldest_job_age_seconds"].samples[0]
    assert shard_sample.labels == {"shard": "0"} and shard_sample.value >= 90
