"""The web API's own answers, in-process through Flask's test client, with a stand-in for the queue:
everything that needs no worker and no Redis (the real-process tests cover the rest)."""

from __future__ import annotations

import io

import pytest
import redis
from PIL import Image

import settings
from helpers import DecodeBudget
from run_web_server import create_app


class StandInQueue:
    """Answers as JobQueue would: `accept` False is a full queue; `down` raises as an unreachable Redis."""

    def __init__(self, accept: bool = True, down: bool = False) -> None:
        self.accept, self.down = accept, down
        self.enqueued: list = []

    def enqueue(self, job, max_queue: int) -> bool:
        if self.down:
            raise redis.ConnectionError("Connection refused")
        self.enqueued.append(job)
        return self.accept

    def take_result(self, origin: str, job_id: str, shard: int = 0) -> dict:
        return {"success": True, "predictions": [{"label": "castle", "probability": 0.5}]}

    def depths(self) -> list[int]:
        return [len(self.enqueued)]

    def dead_letter_counts(self) -> list[int]:
        return [0]


def client_for(queue: StandInQueue, **env: str):
    config = settings.load(env={"MAX_UPLOAD_BYTES": "200000", **env}, dotenv=False)
    app = create_app(config, queue=queue)
    app.testing = True
    return app.test_client(), app


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def upload(data: bytes, name: str = "image") -> dict:
    return {"data": {name: (io.BytesIO(data), "photo.png")}, "content_type": "multipart/form-data"}


def assert_error(response, status: int, words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["success"] is False and words.lower() in body["error"].lower(), body
    return body


def test_an_upload_is_queued_and_its_result_returned():
    queue = StandInQueue()
    client, _ = client_for(queue)
    response = client.post("/predict", **upload(png(40, 30)))
    assert response.status_code == 200 and response.get_json()["predictions"][0]["label"] == "castle"
    assert len(queue.enqueued) == 1 and queue.enqueued[0].shape == [224, 224, 3]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "field named 'image'"),
        (upload(png(40, 30), name="photo"), "field named 'image'"),
        (upload(b""), "empty"),
        (upload(b"plain text, not a picture"), "not an image"),
        (upload(png(40, 30)[:60]), "damaged or truncated"),
        (upload(png(6300, 6300)), "MAX_DECODE_BYTES"),
    ],
    ids=["no-body", "other-field", "empty", "text", "truncated", "costly-to-decode"],
)
def test_bad_uploads_get_400_json_and_nothing_is_queued(kwargs, words):
    queue = StandInQueue()
    client, _ = client_for(queue)
    assert_error(client.post("/predict", **kwargs), 400, words)
    assert queue.enqueued == []


def test_get_on_predict_is_405_with_allow():
    client, _ = client_for(StandInQueue())
    response = client.get("/predict")
    assert_error(response, 405, "method")
    assert "POST" in response.headers["Allow"]


def test_a_body_over_max_upload_bytes_is_413():
    client, _ = client_for(StandInQueue())
    assert_error(client.post("/predict", **upload(b"x" * 300_000)), 413, "MAX_UPLOAD_BYTES")


@pytest.mark.parametrize(
    "queue, words",
    [(StandInQueue(accept=False), "queue full"), (StandInQueue(down=True), "unavailable")],
    ids=["queue-full", "redis-down"],
)
def test_no_room_or_no_redis_is_503_with_retry_after(queue, words):
    client, _ = client_for(queue)
    response = client.post("/predict", **upload(png(40, 30)))
    assert_error(response, 503, words)
    assert response.headers["Retry-After"] == "1"


def test_a_full_decode_budget_is_503_with_retry_after():
    queue = StandInQueue()
    client, app = client_for(queue, DECODE_WAIT="0.1")
    budget: DecodeBudget = app.extensions["imgserve"].decode_budget
    with budget.hold(budget.capacity):  # another upload is decoding as much as the budget allows
        response = client.post("/predict", **upload(png(40, 30)))
    assert_error(response, 503, "busy decoding")
    assert response.headers["Retry-After"] == "1" and queue.enqueued == []


def test_healthz_answers_without_redis():
    client, _ = client_for(StandInQueue(down=True))
    assert client.get("/healthz").get_json() == {"status": "ok"}
