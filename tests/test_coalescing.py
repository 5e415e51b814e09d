"""The result cache and client deadlines with real processes: Redis, gunicorn (two processes) and a stand-in
model worker (tools/standin.py) that serves its metrics, so that its jobs are counted where it runs them."""

from __future__ import annotations

import re
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from imgserve.launch.local_redis import free_port
from tools.processes import Child, sample_image_bytes, server_env, start_web, wait_until

pytestmark = pytest.mark.system

UPLOADS = 100


def worker_jobs(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {name: float(v) for name, v in re.findall(r'^worker_jobs_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def standin(env: dict[str, str], seconds_per_image: float) -> Child:
    """A stand-in worker, returned once its metrics answer."""
    child = Child([sys.executable, "-m", "tools.standin", "--seconds-per-image", str(seconds_per_image)], env)
    child.wait_for_http(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", 60)
    return child


def post_all(url: str, count: int, **kwargs) -> list[requests.Response]:
    files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
    with ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(lambda _: requests.post(url + "/predict", files=files, timeout=60, **kwargs), range(count))
        )


@pytest.mark.parametrize("cache_ttl, jobs", [("60", 1), ("0", UPLOADS)], ids=["cache-on", "cache-off"])
def test_concurrent_identical_uploads_cost_one_inference_with_the_cache_on(redis_server, cache_ttl, jobs):
    env = server_env(redis_server.url, f"coalesce-{uuid.uuid4().hex[:6]}", RESULT_CACHE_TTL=cache_ttl,
                     METRICS_PORT=free_port(), REQUEST_TIMEOUT=60)  # fmt: skip
    worker = standin(env, 0.05)
    web = start_web(env, gunicorn=True, processes=2)
    try:
        answers = post_all(web.url, UPLOADS)
        port = int(env["METRICS_PORT"])
        counts = wait_until(lambda: (c := worker_jobs(port)).get("done", 0) >= jobs and c, 30, "the jobs counted")
        again = post_all(web.url, 1)[0]
        after = worker_jobs(int(env["METRICS_PORT"]))
        cache = dict(re.findall(r'^web_result_cache_total\{outcome="(\w+)"\} (\S+)$',
                                requests.get(web.url + "/metrics", timeout=10).text, re.M))  # fmt: skip
    finally:
        web.stop()
        worker.stop()
    assert [a.status_code for a in answers] == [200] * UPLOADS
    assert len({str(a.json()["predictions"]) for a in answers}) == 1 and answers[0].json()["model"] == "stand-in"
    assert counts["done"] == jobs
    if cache_ttl != "0":
        assert again.json() == answers[0].json() and after["done"] == 1  # a hit: no job
        assert float(cache["miss"]) == 1 and float(cache["hit"]) + float(cache["coalesced"]) == UPLOADS
    else:
        assert after["done"] == UPLOADS + 1 and float(cache["miss"]) == 0


def test_the_clients_timeout_ends_the_wait_and_the_worker_drops_its_expired_submitted_job(redis_server):
    env = server_env(redis_server.url, f"deadline-{uuid.uuid4().hex[:6]}", METRICS_PORT=free_port(),
                     REQUEST_TIMEOUT=60, BATCH_SIZE=1, PREFETCH_BATCHES=0)  # fmt: skip
    worker = standin(env, 3)  # PREFETCH_BATCHES=0: a job claimed ahead would be checked before its deadline
    web = start_web(env)
    files = {"image": ("castle.jpg", sample_image_bytes(), "image/jpeg")}
    try:
        busy = requests.post(web.url + "/jobs", files=files, timeout=10).json()["id"]
        wait_until(lambda: requests.get(f"{web.url}/jobs/{busy}", timeout=10).json()["status"] == "running", 30,
                   "the worker to be busy")  # fmt: skip
        late = requests.post(web.url + "/jobs", files=files, headers={"Request-Timeout-Ms": "300"}, timeout=10)
        waited = post_all(web.url, 1, headers={"grpc-timeout": "500m"})[0]
        expired = wait_until(lambda: worker_jobs(int(env["METRICS_PORT"])).get("expired"), 30, "the job dropped")
        counts = worker_jobs(int(env["METRICS_PORT"]))
    finally:
        web.stop()
        worker.stop()
    assert waited.status_code == 504 and "0.5 s (the client's grpc-timeout)" in waited.json()["error"]
    assert late.status_code == 202 and expired == 1 and f"dropped expired job {late.json()['id']}" in worker.log
    assert counts["done"] == 1  # the busy job alone: the /predict job was taken back from the queue at its 504
