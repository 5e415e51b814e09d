"""Submitted jobs, several images per request and top_k, with real processes: Redis, a ResNet50 worker
(random weights), and web servers."""

from __future__ import annotations

import io
import re
import sys
import uuid

import pytest
import requests
from PIL import Image

from imgserve.launch.local_redis import free_port
from tools.processes import Child, env_queue, sample_image_bytes, server_env, start_web, start_worker, wait_until

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def env(redis_server) -> dict[str, str]:
    return server_env(redis_server.url, f"jobs-{uuid.uuid4().hex[:6]}", METRICS_PORT=free_port(),
                      WEB_HOST="127.0.0.1", RESULT_TTL=120)  # fmt: skip


@pytest.fixture(scope="module")
def webs(env):
    """Two web processes of one deployment: a job submitted through one is collected through the other."""
    first, second = start_web(env), start_web(env)
    yield first, second
    first.stop()
    second.stop()


def worker_counts(env: dict[str, str]) -> dict[str, float]:
    """The worker's job outcomes and batch-size histogram count/sum, from its /metrics."""
    text = requests.get(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", timeout=10).text
    found = re.findall(r'^worker_jobs_total\{outcome="(\w+)"\} (\S+)$', text, re.MULTILINE)
    found += re.findall(r"^worker_batch_size_(count|sum) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def submit(url: str, top_k: int | None = None) -> requests.Response:
    files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
    return requests.post(url + "/jobs", files=files, params={"top_k": top_k} if top_k else None, timeout=30)


def test_a_cancelled_job_is_never_run_and_a_submitted_one_is_collected_through_another_web_process(env, webs):
    first, second = webs
    cancelled = submit(first.url).json()["id"]  # no worker yet: it waits in the queue
    assert requests.get(f"{second.url}/jobs/{cancelled}", timeout=10).json() == {"id": cancelled, "status": "queued"}
    answer = requests.delete(f"{second.url}/jobs/{cancelled}", timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert requests.get(f"{first.url}/jobs/{cancelled}", timeout=10).status_code == 404
    kept = submit(first.url, top_k=3)
    assert kept.status_code == 202
    status_url = second.url + kept.headers["Location"]
    worker = start_worker(env)
    try:
        done = wait_until(lambda: (b := requests.get(status_url, timeout=10).json())["status"] == "done" and b, 60,
                          "the submitted job to be done")  # fmt: skip
        assert len(done["predictions"]) == 3 and done["weights"] == "none" and done["model"] == "resnet50"
        assert worker_counts(env)["cancelled"] == 1 and worker_counts(env)["done"] == 1
        assert requests.delete(status_url, timeout=10).status_code == 409  # done: too late to cancel
        assert requests.get(f"{first.url}/readyz", timeout=10).json()["models"] == [
            {"model": "resnet50", "weights": "none", "backend": "tensorflow", "precision": "fp32"}
        ]
    finally:
        worker.stop()


def distinct_images(count: int) -> list[bytes]:
    """Images the random-weights model tells apart: each a different colour."""
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (30 * i, 255 - 30 * i, (90 * i) % 256)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def test_eight_images_share_batches_and_come_back_in_order(env, webs):
    web = webs[0]
    images = distinct_images(8)
    worker = start_worker(env)
    try:
        alone = [
            requests.post(web.url + "/predict", files={"image": ("one.png", data)}, timeout=60).json()["predictions"]
            for data in images
        ]
        before = worker_counts(env)
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        answer = requests.post(web.url + "/predict", files=files, timeout=60).json()
        after = worker_counts(env)
    finally:
        worker.stop()
    assert answer["success"] is True
    got = [[p["label"] for p in entry["predictions"]] for entry in answer["results"]]
    assert got == [[p["label"] for p in predictions] for predictions in alone]
    assert after["sum"] - before["sum"] == 8 and after["count"] - before["count"] < 8  # fewer batches than images


def test_top_k_sets_how_many_classes_come_back(env, webs):
    files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
    worker = start_worker(env)
    try:
        answers = {
            k: requests.post(webs[0].url + f"/predict?top_k={k}", files=files, timeout=60).json() for k in (1, 20)
        }
    finally:
        worker.stop()
    for top_k, answer in answers.items():
        probabilities = [p["probability"] for p in answer["predictions"]]
        assert len(probabilities) == top_k and probabilities == sorted(probabilities, reverse=True)


def start_standin(env: dict[str, str], seconds_per_image: float) -> tuple[Child, str]:
    """A stand-in model worker (tools/standin.py), and its id once it has registered."""
    queue = env_queue(env)
    before = queue.inspect.worker_ids()
    worker = Child([sys.executable, "-m", "tools.standin", "--seconds-per-image", str(seconds_per_image)], env)
    try:
        found = wait_until(lambda: queue.inspect.worker_ids() - before, 60, "the stand-in worker to register")
    finally:
        queue.redis.close()
    return worker, next(iter(found))


def test_a_job_whose_worker_died_on_its_last_attempt_says_failed_and_the_client_stops(env, webs, tmp_path):
    """MAX_ATTEMPTS=1: a worker killed (kill -9) while it holds two submitted jobs; another worker's reaper
    dead-letters them, and GET /jobs/<id> then says failed, as simple_request.py --async does."""
    web = webs[0]
    workers_env = dict(env, MAX_ATTEMPTS="1", HEARTBEAT_TTL="2", REAP_INTERVAL="0.5", BATCH_SIZE="4",
                       BATCH_WAIT_MS="500", METRICS_PORT="0")  # fmt: skip
    image = tmp_path / "castle.jpg"
    image.write_bytes(sample_image_bytes())
    client = Child([sys.executable, "simple_request.py", str(image), "--url", web.url, "--async", "--timeout", "120"],
                   env)  # fmt: skip
    ours = submit(web.url).json()["id"]
    queue = env_queue(env)
    survivor = victim = None
    try:
        wait_until(lambda: queue.inspect.depth() == 2, 30, "both jobs queued")
        victim, victim_id = start_standin(workers_env, 60)  # takes both in one batch, then holds it a minute
        wait_until(lambda: requests.get(f"{web.url}/jobs/{ours}", timeout=10).json()["status"] == "running", 30,
                   "the job to be running")  # fmt: skip
        assert len(queue.inspect.claimed(victim_id)) == 2
        victim.process.kill()
        victim.process.wait(30)
        survivor, _ = start_standin(workers_env, 0)
        status_url = f"{web.url}/jobs/{ours}"
        body = wait_until(lambda: (b := requests.get(status_url, timeout=10).json())["status"] != "running" and b, 60,
                          "the reaper to settle the job")  # fmt: skip
        assert client.process.wait(60) == 1
    finally:
        for child in (client, victim, survivor):
            if child is not None:
                child.stop()
        queue.redis.close()
    assert body == {"id": ours, "status": "failed", "error": body["error"]}
    assert "MAX_ATTEMPTS=1" in body["error"] and "stopped sending heartbeats" in body["error"]
    assert "job failed" in client.log and "MAX_ATTEMPTS=1" in client.log and "not done within" not in client.log
