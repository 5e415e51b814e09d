"""End to end: Redis + real model worker processes (ResNet50, random weights) + the web server."""

from __future__ import annotations

import os
import re
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from imgserve.launch.local_redis import free_port
from imgserve.worker.model import keras_labels
from tools.processes import (
    Child,
    PublishedResults,
    live_stack,
    post_image,
    sample_image_bytes,
    server_env,
    start_web,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.system

LABELS = set(keras_labels().tolist())


@pytest.fixture(scope="module")
def stack(redis_server):
    env = server_env(redis_server.url, f"e2e-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5)
    with live_stack(env) as (worker, web):
        yield env, web, worker


def check_predictions(body: dict) -> None:
    assert body["success"] is True
    predictions = body["predictions"]
    assert len(predictions) == 5
    probabilities = [p["probability"] for p in predictions]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(p["label"] in LABELS for p in predictions)


def test_castle_photo_gets_five_predictions(stack):
    _, web, _ = stack
    response = post_image(web.url)
    assert response.status_code == 200, response.text
    check_predictions(response.json())


def test_labels_are_keras_imagenet_names():
    labels = keras_labels()
    assert len(labels) == 1000
    assert (labels[483], labels[497], labels[663], labels[698]) == ("castle", "church", "monastery", "palace")
    assert labels[0] == "tench" and labels[2] == "great_white_shark"


def test_fifty_concurrent_requests_all_succeed(stack):
    _, web, _ = stack
    data = sample_image_bytes()
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: post_image(web.url, data), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    for response in responses:
        check_predictions(response.json())


def test_two_workers_never_process_the_same_job(stack):
    env, web, first = stack
    metrics_port = free_port()
    second = start_worker(dict(env, METRICS_PORT=str(metrics_port), WEB_HOST="127.0.0.1"))
    try:
        data = sample_image_bytes()
        with PublishedResults(env["REDIS_URL"], env["IMAGE_QUEUE"]) as published:
            with ThreadPoolExecutor(24) as pool:
                responses = list(pool.map(lambda _: post_image(web.url, data), range(60)))
            counts = published.wait_for(60)
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        second.stop()
    assert [r.status_code for r in responses] == [200] * 60
    assert len(counts) == 60 and max(counts.values()) == 1, "no job was processed twice"
    done = re.search(r'^worker_jobs_total\{outcome="done"\} (\S+)$', metrics, re.MULTILINE)
    assert done and float(done.group(1)) > 0, "the second worker took part"


def test_readyz_reports_worker_and_queue(stack):
    _, web, _ = stack
    body = requests.get(web.url + "/readyz", timeout=5).json()
    assert body["ready"] is True and body["workers"] >= 1 and body["redis"] is True
    assert body["wait_mode"] == "notifications"


def test_imagenet_weights_without_network_exit_with_clear_message(redis_server, tmp_path):
    env = server_env(
        redis_server.url,
        "unused",
        MODEL_WEIGHTS="imagenet",
        KERAS_HOME=str(tmp_path),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    child = Child([sys.executable, "run_model_server.py"], env)
    assert child.process.wait(120) == 3
    log = child.log
    assert "could not get the ImageNet weights" in log
    assert "MODEL_WEIGHTS" in log and "Traceback" not in log


def test_gunicorn_web_processes_run_at_lower_priority_by_web_nice(redis_server):
    from tools.load import with_children

    base = os.getpriority(os.PRIO_PROCESS, 0)
    web = start_web(server_env(redis_server.url, "nice", WEB_NICE=7), gunicorn=True, processes=2)

    def priorities() -> list[int]:  # the second web process may still be starting
        return [os.getpriority(os.PRIO_PROCESS, pid) for pid in with_children(web.process.pid)[1:]]

    try:
        wait_until(lambda: priorities() == [min(base + 7, 19)] * 2, 30, "both web processes at the lower priority")
        assert os.getpriority(os.PRIO_PROCESS, web.process.pid) == base  # only the processes that serve requests
    finally:
        web.stop()
