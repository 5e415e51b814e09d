"""Client deadlines and the result cache, in-process: the header parsing, the cache key, and the web API
through Flask's test client with a stand-in queue whose cache is a real Redis (the real-process test of
100 identical uploads is tests/test_coalescing.py)."""

from __future__ import annotations

import io
import threading
import uuid

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgserve.protocol.cache import request_digest
from imgserve.web.deadlines import client_timeout, effective_timeout
from imgserve.web.errors import Refused
from tests.support.web import MODEL, StandInQueue
from tests.test_web import assert_error, client_for, png, upload
from tools.processes import wait_until

pytestmark = pytest.mark.unit

ANSWER = {"success": True, "predictions": [{"label": "castle", "probability": 0.5}], **MODEL}


# ---- client deadlines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, seconds, source",
    [
        ({"Request-Timeout-Ms": "2500"}, 2.5, "Request-Timeout-Ms"),
        ({"grpc-timeout": "3S"}, 3.0, "grpc-timeout"),
        ({"grpc-timeout": "1H"}, 3600.0, "grpc-timeout"),
        ({"grpc-timeout": "2M"}, 120.0, "grpc-timeout"),
        ({"grpc-timeout": "1500m"}, 1.5, "grpc-timeout"),
        ({"grpc-timeout": "250000u"}, 0.25, "grpc-timeout"),
        ({"grpc-timeout": "99999999n"}, 0.099999999, "grpc-timeout"),
        ({"Request-Timeout-Ms": "900", "grpc-timeout": "2S"}, 0.9, "Request-Timeout-Ms"),
        ({"Request-Timeout-Ms": "9000", "grpc-timeout": "2S"}, 2.0, "grpc-timeout"),
    ],
)
def test_a_client_timeout_is_read_from_either_header_and_the_smaller_wins(headers, seconds, source):
    timeout = client_timeout(headers)
    assert timeout.seconds == pytest.approx(seconds) and timeout.source == source


@pytest.mark.parametrize(
    "header, value",
    [
        ("Request-Timeout-Ms", "0"),
        ("Request-Timeout-Ms", "-5"),
        ("Request-Timeout-Ms", "1.5"),
        ("Request-Timeout-Ms", "soon"),
        ("Request-Timeout-Ms", "12345678901"),
        ("Request-Timeout-Ms", ""),
        ("grpc-timeout", "5"),
        ("grpc-timeout", "5s"),
        ("grpc-timeout", "123456789S"),
        ("grpc-timeout", "0m"),
        ("grpc-timeout", "1.5S"),
    ],
)
def test_an_unreadable_timeout_is_refused_naming_its_header(header, value):
    with pytest.raises(Refused) as refused:
        client_timeout({header: value})
    assert refused.value.status == 400 and header in refused.value.message


def test_a_client_timeout_only_lowers_the_servers():
    assert effective_timeout({}, 30, "REQUEST_TIMEOUT").source == "REQUEST_TIMEOUT"
    assert effective_timeout({"Request-Timeout-Ms": "60000"}, 30, "REQUEST_TIMEOUT").seconds == 30
    lowered = effective_timeout({"Request-Timeout-Ms": "200"}, 30, "REQUEST_TIMEOUT")
    assert lowered.seconds == 0.2 and lowered.describe() == "0.2 s (the client's Request-Timeout-Ms)"


class SilentQueue(StandInQueue):
    """A queue whose jobs never get a result."""

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> None:
        return None

    def cancel(self, job) -> bool:
        return True


@pytest.mark.parametrize("path", ["/predict", "/jobs"])
@pytest.mark.parametrize("header", ["Request-Timeout-Ms", "grpc-timeout"])
def test_a_bad_timeout_header_is_400_and_nothing_is_queued(path, header):
    queue = StandInQueue()
    client, _ = client_for(queue)
    assert_error(client.post(path, headers={header: "never"}, **upload(png(40, 30))), 400, header)
    assert queue.enqueued == []


def test_predict_past_the_clients_timeout_is_504_naming_the_clients_limit():
    queue = SilentQueue()
    client, _ = client_for(queue, REQUEST_TIMEOUT="30")
    response = client.post("/predict", headers={"Request-Timeout-Ms": "150"}, **upload(png(40, 30)))
    assert_error(response, 504, "0.15 s (the client's Request-Timeout-Ms)")
    [job] = queue.enqueued
    assert job.deadline - job.enqueued_at == pytest.approx(0.15)


def test_predict_past_request_timeout_is_504_naming_the_setting():
    client, _ = client_for(SilentQueue(), REQUEST_TIMEOUT="0.1")
    response = client.post("/predict", headers={"Request-Timeout-Ms": "60000"}, **upload(png(40, 30)))
    assert_error(response, 504, "0.1 s (REQUEST_TIMEOUT)")


def test_a_submitted_jobs_deadline_is_lowered_by_the_clients_timeout():
    queue = StandInQueue()
    client, _ = client_for(queue, RESULT_TTL="3600")
    assert client.post("/jobs", headers={"grpc-timeout": "2S"}, **upload(png(40, 30))).status_code == 202
    assert client.post("/jobs", **upload(png(40, 30))).status_code == 202
    lowered, default = queue.enqueued
    assert lowered.deadline - lowered.enqueued_at == pytest.approx(2)
    assert default.deadline - default.enqueued_at == pytest.approx(3600)


# ---- the cache key -----------------------------------------------------------------------------------------


def test_the_cache_key_tells_pixels_shape_model_and_top_k_apart():
    pixels = np.zeros((224, 224, 3), np.uint8)
    other = pixels.copy()
    other[100, 100, 1] = 1
    key = request_digest(pixels, 5)
    assert key == request_digest(pixels.copy(), 5) == request_digest(pixels, 5, "resnet50")
    different = {
        request_digest(other, 5),
        request_digest(pixels, 3),
        request_digest(pixels, 5, "efficientnet"),
        request_digest(pixels.reshape(224, 672, 1), 5),
        request_digest(pixels.astype(np.int8), 5),
    }
    assert key not in different and len(different) == 5


# ---- the cache through the web API ---------------------------------------------------------------------------


class CachedQueue(StandInQueue):
    """The stand-in queue, with a real Redis for the result cache; `answer` is what every job gets, once
    `release` is set."""

    def __init__(self, client, answer: dict = ANSWER) -> None:
        super().__init__()
        self.redis, self.name, self.answer = client, f"cache-{uuid.uuid4().hex[:8]}", answer
        self.base = self.name  # the queue the cache keys live under (IMAGE_QUEUE)
        self.release = threading.Event()
        self.release.set()

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict | None:
        return dict(self.answer) if self.release.is_set() else None


def other_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 60)).save(out, "PNG")
    return out.getvalue()


def cache_counts(client) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    family = next(f for f in text_string_to_metric_families(text) if f.name == "web_result_cache")
    return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_a_repeated_upload_is_answered_from_the_cache_and_a_different_one_is_not(redis_client):
    queue = CachedQueue(redis_client)
    client, _ = client_for(queue, RESULT_CACHE_TTL="60")
    before = cache_counts(client)
    first = client.post("/predict", **upload(png(40, 30)))
    again = client.post("/predict", **upload(png(40, 30)))
    assert first.status_code == again.status_code == 200 and again.get_json() == first.get_json()
    assert len(queue.enqueued) == 1
    client.post("/predict?top_k=3", **upload(png(40, 30)))
    client.post("/predict", **upload(other_png()))  # a solid png(41, 30) would prepare to the same pixels
    assert len(queue.enqueued) == 3
    after = cache_counts(client)
    assert {k: after[k] - before[k] for k in after} == {"hit": 1, "miss": 3, "coalesced": 0}


def test_with_the_cache_off_every_upload_is_a_job(redis_client):
    queue = CachedQueue(redis_client)
    client, _ = client_for(queue)
    for _ in range(3):
        assert client.post("/predict", **upload(png(40, 30))).status_code == 200
    assert len(queue.enqueued) == 3 and redis_client.keys(f"{queue.name}:*") == []


def test_a_failed_result_is_never_cached(redis_client):
    failed = {"success": False, "error": "job failed: out of memory", "status": 500}
    queue = CachedQueue(redis_client, failed)
    client, _ = client_for(queue, RESULT_CACHE_TTL="60")
    for _ in range(2):
        assert_error(client.post("/predict", **upload(png(40, 30))), 500, "out of memory")
    assert len(queue.enqueued) == 2 and redis_client.keys(f"{queue.name}:cache:*") == []


def post_together(app, count: int) -> list:
    """`count` identical uploads at once, each from its own thread and test client."""
    responses: list = [None] * count

    def post(number: int) -> None:
        responses[number] = app.test_client().post("/predict", **upload(png(40, 30)))

    threads = [threading.Thread(target=post, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads, responses


def test_identical_uploads_in_flight_share_one_job_within_a_process_and_across_processes(redis_client):
    """Two apps (two web processes' Services) on one Redis: the first job's lease makes the other app's
    requests wait for its cached result too."""
    queue = CachedQueue(redis_client)
    queue.release.clear()  # the first job's result waits until released
    _, first_app = client_for(queue, RESULT_CACHE_TTL="60")
    _, second_app = client_for(queue, RESULT_CACHE_TTL="60")
    before = cache_counts(first_app.test_client())  # the counters are this Python process's: both apps'
    threads, responses = post_together(first_app, 20)
    more_threads, more_responses = post_together(second_app, 20)
    wait_until(lambda: queue.enqueued, 30, "the first job to be queued")
    queue.release.set()
    for thread in threads + more_threads:
        thread.join(30)
    assert [r.status_code for r in responses + more_responses] == [200] * 40
    assert {r.get_json()["predictions"][0]["label"] for r in responses + more_responses} == {"castle"}
    assert len(queue.enqueued) == 1
    after = cache_counts(first_app.test_client())
    delta = {k: after[k] - before[k] for k in after}
    assert delta["miss"] == 1 and delta["hit"] + delta["coalesced"] == 39 and delta["coalesced"] >= 1
