"""Prometheus metrics: the web app's /metrics (plain and under gunicorn) and the worker's endpoint."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from imgserve.launch.local_redis import free_port
from imgserve.protocol import Job, connect
from imgserve.worker import pipeline
from tests.test_faults import RunningWorker, worker_config
from tools.processes import live_stack, post_image, sample_image_bytes, server_env, start_web, wait_until
from tools.queues import Queues

pytestmark = pytest.mark.system

PREDICT_OK = {"endpoint": "/predict", "method": "POST", "status": "200"}
HEALTHZ_OK = {"endpoint": "/healthz", "method": "GET", "status": "200"}


@pytest.fixture(scope="module")
def stack(redis_server):
    metrics_port = free_port()
    env = server_env(redis_server.url, f"metrics-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5, METRICS_PORT=metrics_port)
    with live_stack(env) as (_, web):
        yield env, web, f"http://127.0.0.1:{metrics_port}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    text = requests.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- web, single process ---------------------------------------------------------------------


def test_web_metrics_count_requests_by_endpoint_and_status(stack):
    _, web, _ = stack
    before = scrape(web.url + "/metrics")
    data = sample_image_bytes()
    assert [post_image(web.url, data).status_code for _ in range(3)] == [200] * 3
    assert requests.post(web.url + "/predict", timeout=10).status_code == 400
    assert [requests.get(web.url + "/healthz", timeout=10).status_code for _ in range(2)] == [200] * 2
    assert requests.get(web.url + "/no/such/page", timeout=10).status_code == 404
    after = scrape(web.url + "/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("web_requests_total", **PREDICT_OK) == 3
    assert delta("web_requests_total", endpoint="/predict", method="POST", status="400") == 1
    assert delta("web_requests_total", **HEALTHZ_OK) == 2
    assert delta("web_requests_total", endpoint="unmatched", method="GET", status="404") == 1
    assert delta("web_predict_seconds_count") == 4
    assert delta("web_predict_seconds_sum") > 0
    assert value(after, "web_queue_depth") == 0
    assert value(after, "web_requests_in_progress") == 1  # the scrape itself


def test_queue_depth_is_read_from_redis_at_scrape_time(redis_server):
    name = f"depth-{uuid.uuid4().hex[:6]}"
    web = start_web(server_env(redis_server.url, name))  # no worker: jobs stay queued
    try:
        queue = Queues.on(connect(redis_server.url), name)
        pixels = np.zeros((224, 224, 3), np.uint8)
        for _ in range(3):
            assert queue.web.enqueue(Job.new(pixels, "000000007e57", 60), max_queue=100)
        assert value(scrape(web.url + "/metrics"), "web_queue_depth") == 3
        queue.web.enqueue(Job.new(pixels, "000000007e57", 60), max_queue=100)
        assert value(scrape(web.url + "/metrics"), "web_queue_depth") == 4
    finally:
        web.stop()


# ---- web, several gunicorn processes ---------------------------------------------------------


def healthz_count_per_process(directory: Path) -> dict[int, float]:
    """The /healthz 200 count each web process wrote to the multiprocess directory."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        samples = [s for m in MultiProcessCollector.merge([str(path)]) for s in m.samples]
        counts[pid] = sum(s.value for s in samples if s.name == "web_requests_total" and s.labels == HEALTHZ_OK)
    return counts


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_gunicorn_processes_metrics_add_up(stack, tmp_path):
    env, _, _ = stack
    web = start_web(dict(env, PROMETHEUS_MULTIPROC_DIR=str(tmp_path)), gunicorn=True, processes=2)
    try:
        sent = sum(healthz_count_per_process(tmp_path).values())  # start_web's readiness check
        with ThreadPoolExecutor(8) as pool:
            # Concurrent connections spread over both processes; keep going until both have answered some.
            for _ in range(100):
                codes = list(pool.map(lambda _: requests.get(web.url + "/healthz", timeout=10).status_code, range(40)))
                assert codes == [200] * 40
                sent += 40
                if sum(1 for n in healthz_count_per_process(tmp_path).values() if n > 0) >= 2:
                    break
        per_process = healthz_count_per_process(tmp_path)
        assert len([n for n in per_process.values() if n > 0]) == 2, per_process
        assert sum(per_process.values()) == sent
        assert [post_image(web.url).status_code for _ in range(2)] == [200, 200]
        for _ in range(6):  # whichever process answers the scrape, it reports both processes' requests
            samples = scrape(web.url + "/metrics")
            assert value(samples, "web_requests_total", **HEALTHZ_OK) == sent
            assert value(samples, "web_requests_total", **PREDICT_OK) == 2
            assert value(samples, "web_predict_seconds_count") == 2

        # A process that dies: gunicorn's child_exit hook drops its live gauge; its counts stay.
        victim = next(pid for pid in per_process if parent_pid(pid) == web.process.pid)
        live_gauge = tmp_path / f"gauge_livesum_{victim}.db"
        assert live_gauge.exists()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not live_gauge.exists(), 30, "the dead process's live gauge file to go")
        assert not live_gauge.exists()
        assert value(scrape(web.url + "/metrics"), "web_requests_total", **HEALTHZ_OK) == sent
    finally:
        web.stop()


# ---- model worker ----------------------------------------------------------------------------


def test_worker_metrics_count_done_jobs_batches_and_inference(stack):
    _, web, worker_metrics = stack
    before = scrape(worker_metrics)
    for outcome in pipeline.JOB_OUTCOMES:
        assert ("worker_jobs_total", (("outcome", outcome),)) in before, outcome
    assert post_image(web.url).status_code == 200
    done_before = value(before, "worker_jobs_total", outcome="done")
    # The worker counts a job after publishing its result, so the client can be a moment earlier.
    wait_until(
        lambda: value(scrape(worker_metrics), "worker_jobs_total", outcome="done") > done_before, 30, "a done job"
    )
    after = scrape(worker_metrics)
    assert value(after, "worker_jobs_total", outcome="done") == done_before + 1
    assert value(after, "worker_batch_size_count") > value(before, "worker_batch_size_count")
    assert value(after, "worker_inference_seconds_count") > value(before, "worker_inference_seconds_count")
    assert value(after, "worker_inference_seconds_sum") > value(before, "worker_inference_seconds_sum")


def test_worker_metrics_count_dead_lettered_and_expired_jobs(stack, redis_server):
    env, _, worker_metrics = stack
    queue = Queues.on(connect(redis_server.url), env["IMAGE_QUEUE"])
    before = scrape(worker_metrics)
    expired = Job.new(np.zeros((224, 224, 3), np.uint8), "0000000000b0", 60)
    expired.deadline = time.time() - 1
    queue.redis.lpush(queue.keys.queue, b"this is not a job", expired.to_json())

    def counted(outcome: str) -> float:
        return value(scrape(worker_metrics), "worker_jobs_total", outcome=outcome) - value(
            before, "worker_jobs_total", outcome=outcome
        )

    wait_until(lambda: counted("dead_lettered") >= 1 and counted("expired") >= 1, 30, "the counted outcomes")
    assert counted("dead_lettered") == 1
    assert counted("expired") == 1


class BrokenClassifier:
    """Stands in for the model to make inference fail."""

    def classify(self, images: np.ndarray, k: int = 5) -> list:
        raise RuntimeError("inference exploded")


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_failed_inference_is_counted(redis_server, queue_name, max_attempts):
    """Each failed attempt is counted, the job requeued until MAX_ATTEMPTS, then dead-lettered."""
    queue = Queues.on(connect(redis_server.url), queue_name)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value("worker_jobs_total", {"outcome": name}) or 0.0

    before = {name: sample(name) for name in ("failed", "requeued", "dead_lettered")}
    queue.web.enqueue(Job.new(np.zeros((224, 224, 3), np.uint8), "0000000007e5", 60), max_queue=10)
    with RunningWorker(worker_config(redis_server.url, queue_name, MAX_ATTEMPTS=max_attempts), BrokenClassifier()):
        wait_until(lambda: queue.inspect.dead_letters(), 30, "the job dead-lettered")
    assert sample("failed") == before["failed"] + max_attempts
    assert sample("requeued") == before["requeued"] + max_attempts - 1
    assert sample("dead_lettered") == before["dead_lettered"] + 1
    assert queue.inspect.depth() == 0 and len(queue.inspect.dead_letters()) == 1
