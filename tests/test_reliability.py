"""Lose nothing: worker crashes, Redis outages, poison and bad jobs, deadlines, bad uploads, shutdown.

Real processes against a real Redis: model workers (ResNet50, random weights), the web server under
Flask's development server and under gunicorn. Every worker start loads TensorFlow (~10 s), so one
worker and one web server are shared by the module; tests that kill or stop processes start their own.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import pickle
import signal
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from PIL import Image

from imgserve.launch.local_redis import LocalRedis, free_port
from imgserve.protocol import Job, ResultListener, WebQueue, connect, job_metadata
from imgserve.protocol.notifications import common_flags
from imgserve.protocol.web_queue import TAKEN_RESULT_TTL_MS
from tests.support.freezing import freeze, freeze_holding_jobs
from tests.support.metrics import metric
from tools import processes
from tools.processes import (
    Child,
    PublishedResults,
    WebServer,
    Worker,
    sample_image_bytes,
    server_env,
    start_web,
    start_worker,
    wait_until,
)
from tools.queues import Queues

pytestmark = pytest.mark.system

PIXELS = np.zeros((224, 224, 3), np.uint8)
DROP = object()  # marks a field to leave out of a hand-written job


# ---- helpers ------------------------------------------------------------------------------------


post_image = functools.partial(processes.post_image, timeout=180)  # held and frozen batches answer late


def assert_json_error(response: requests.Response, status: int | tuple[int, ...], text: str = "") -> dict:
    """Check an error answer: the status, JSON with success false, and an error message containing `text`."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["success"] is False and isinstance(body["error"], str) and body["error"]
    assert text.lower() in body["error"].lower(), body["error"]
    return body


# ---- the shared stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    """The module's shared worker and web server, and a queue client for looking into Redis."""

    env: dict[str, str]
    worker: Child
    web: WebServer
    queue: Queues
    metrics_port: int

    def extra_worker_env(self) -> dict[str, str]:
        """Environment for one more worker on the same queue (the metrics port is taken)."""
        return dict(self.env, METRICS_PORT="0")


@pytest.fixture(scope="module")
def stack(redis_server):
    metrics_port = free_port()
    name = f"rel-{uuid.uuid4().hex[:6]}"
    env = server_env(
        redis_server.url,
        name,
        BATCH_SIZE=4,
        BATCH_WAIT_MS=5,
        REQUEST_TIMEOUT=120,
        MAX_UPLOAD_BYTES=4_000_000,
        METRICS_PORT=metrics_port,
    )
    worker = start_worker(env)
    web = start_web(env)
    client = connect(redis_server.url)
    yield Stack(env, worker, web, Queues.on(client, name), metrics_port)
    web.stop()
    worker.stop()
    client.close()


# ---- worker crashes -----------------------------------------------------------------------------


def test_kill_9_of_one_of_two_workers_mid_batch_loses_no_request(stack):
    victim = start_worker(stack.extra_worker_env())
    requeued_before = metric(stack.metrics_port, "worker_jobs_total", outcome="requeued")
    data = sample_image_bytes()
    try:
        with PublishedResults(stack.env["REDIS_URL"], stack.env["IMAGE_QUEUE"]) as published:
            with ThreadPoolExecutor(100) as pool:
                futures = [pool.submit(post_image, stack.web.url, data) for _ in range(100)]
                held = freeze_holding_jobs(victim, stack.queue)
                victim.process.kill()  # SIGKILL: no cleanup, its batches stay in its processing lists
                victim.process.wait(30)
                killed_at = time.monotonic()
                responses = [future.result() for future in futures]
            counts = published.wait_for(100)
    finally:
        victim.stop()
    assert [r.status_code for r in responses] == [200] * 100
    assert all(len(r.json()["predictions"]) == 5 for r in responses)
    assert len(counts) == 100, "every request was answered by a published result"
    assert max(counts.values()) == 1, "no result was published twice"
    redone = [published.times[job.id][0] for job in held]
    assert all(at > killed_at for at in redone), "the killed worker's batch was published only after it died"
    requeued = metric(stack.metrics_port, "worker_jobs_total", outcome="requeued") - requeued_before
    assert requeued >= len(held), "the survivor's reaper returned the dead worker's jobs to the queue"


def test_sigterm_mid_batch_finishes_the_batch_and_exits_0(stack):
    leaving = start_worker(stack.extra_worker_env())
    data = sample_image_bytes()
    try:
        with PublishedResults(stack.env["REDIS_URL"], stack.env["IMAGE_QUEUE"]) as published:
            with ThreadPoolExecutor(40) as pool:
                futures = [pool.submit(post_image, stack.web.url, data) for _ in range(40)]
                held = freeze_holding_jobs(leaving, stack.queue)
                freeze(stack.worker)  # the other worker cannot take anything now: whatever is published is the leaver's
                try:
                    os.kill(leaving.process.pid, signal.SIGTERM)  # delivered as soon as it runs again
                    os.kill(leaving.process.pid, signal.SIGCONT)
                    assert leaving.process.wait(60) == 0
                    held_ids = {job.id for job in held}
                    wait_until(lambda: held_ids <= set(published.times), 10, "the leaver's last results")
                    finished_by_leaver = set(published.times)
                finally:
                    os.kill(stack.worker.process.pid, signal.SIGCONT)
                responses = [future.result() for future in futures]
            counts = published.wait_for(40)
    finally:
        leaving.stop()
    assert [r.status_code for r in responses] == [200] * 40
    assert len(counts) == 40 and max(counts.values()) == 1
    assert {job.id for job in held} <= finished_by_leaver, "the batch in hand was finished, not dropped"
    wait_until(lambda: len(stack.queue.inspect.live_worker_models()) == 1, 30, "the leaving worker to unregister")


def test_heartbeat_re_registers_a_worker_that_was_reaped(queue):
    """A worker paused longer than HEARTBEAT_TTL (or cut off from Redis) is reaped; when it comes back its
    heartbeat must put it back on the reaper's list, or a later crash of it would lose its jobs."""
    queue.worker.heartbeat("slow", 0.2)
    time.sleep(0.3)
    assert queue.worker.reap()[0] == 1 and len(queue.inspect.live_worker_models()) == 0
    queue.worker.heartbeat("slow", 5)
    assert len(queue.inspect.live_worker_models()) == 1
    queue.web.enqueue(Job.new(PIXELS, "0123456789ab", 30), 100)
    queue.worker.claim_batch("slow", 1, 0, 1)
    queue.worker.heartbeat("slow", 0.2)
    time.sleep(0.3)
    assert queue.worker.reap() == (1, 1, 0), "the crashed worker's job went back to the queue"


# ---- poison jobs and bad jobs -------------------------------------------------------------------


def test_job_that_kills_every_worker_is_dead_lettered_and_its_client_answered(redis_server):
    """The poison is simulated by SIGKILLing whichever worker holds the job (as an OOM kill or a crash in
    native code would); MAX_ATTEMPTS=2, so two such deaths dead-letter it."""
    name = f"poison-{uuid.uuid4().hex[:6]}"
    # A long batch wait keeps a claimed job in the worker's hands for 2 s before the model runs.
    env = server_env(redis_server.url, name, MAX_ATTEMPTS=2, BATCH_SIZE=4, BATCH_WAIT_MS=2000)
    children = [Worker(env) for _ in range(3)]
    web = None
    queue = Queues.on(connect(redis_server.url), name)
    try:
        for child in children:
            child.wait_registered(240)
        web = start_web(dict(env, REQUEST_TIMEOUT="120"))
        with ThreadPoolExecutor(1) as pool:
            poisoned = pool.submit(post_image, web.url, sample_image_bytes())
            victims, delivered = [], []
            for delivery in (1, 2):
                holder, [job] = wait_until(lambda: holding(children, queue, exclude=victims), 60, "a holder")
                delivered.append(job.id)
                assert job.attempts == delivery - 1 and len(set(delivered)) == 1
                freeze(holder)
                assert len(queue.inspect.claimed(holder.id)) == 1, "still unacknowledged"
                holder.process.kill()
                holder.process.wait(30)
                victims.append(holder)
            response = poisoned.result()
        body = assert_json_error(response, 500, "delivered 2 times (MAX_ATTEMPTS=2)")
        assert "stopped sending heartbeats" in body["error"]
        [letter] = queue.inspect.dead_letters()
        assert letter["job"]["id"] == job.id and "MAX_ATTEMPTS=2" in letter["reason"]
        assert queue.inspect.depth() == 0
        [survivor] = [child for child in children if child not in victims]
        assert post_image(web.url, sample_image_bytes()).status_code == 200
        assert survivor.stop(signal.SIGINT) == 0, "Ctrl-C stops a worker cleanly"
    finally:
        for child in [*children, *([web] if web else [])]:
            child.stop(signal.SIGKILL)
        queue.redis.close()


def holding(children: list[Worker], queue: Queues, exclude: list[Worker]) -> tuple[Worker, list[Job]] | None:
    """The first worker (not in `exclude`) whose processing lists hold jobs, with those jobs."""
    for child in children:
        if child in exclude:
            continue
        held = queue.inspect.claimed(child.id)
        if held:
            return child, [Job.from_json(raw) for raw in held]
    return None


def bad_jobs() -> list[tuple[bytes, str, Job | None]]:
    """Hand-written jobs a worker cannot use: (raw, expected reason, the job when its id can be read)."""

    def variant(reason: str, answered: bool = True, **changes: object) -> tuple[bytes, str, Job | None]:
        job = Job.new(PIXELS, "00000000a4d0", 60)
        data = {k: v for k, v in (json.loads(job.to_json()) | changes).items() if v is not DROP}
        return json.dumps(data).encode(), reason, job if answered else None

    small = np.zeros((10, 10, 3), np.uint8)
    packed = base64.b64decode(Job.new(PIXELS, "000000000001", 1, codec="zstd").image)
    return [
        (b"{not json", "not valid JSON", None),
        (pickle.dumps({"id": "x", "origin": "y"}), "not valid JSON", None),  # the queue carries JSON only
        (b"\xff\xfe\x00\x81", "not valid JSON", None),
        (b"[" * 100_000, "not valid JSON", None),  # nesting too deep for the JSON parser
        (b'"just a string"', "not a JSON object", None),
        variant("lacks field(s): image, shape, dtype, deadline", image=DROP, shape=DROP, dtype=DROP, deadline=DROP),
        variant("not valid base64", image="@@@ not base64 @@@"),
        variant("got uint8 (10, 10, 3)", shape=[10, 10, 3], image=Job.new(small, "000000000001", 1).image),
        variant("got float32 (224, 224, 3)", dtype="float32"),
        variant("image has 3 bytes", image="AAAA"),
        variant("unknown image codec 'png'", codec="png"),
        variant("not a Zstandard frame", codec="zstd", image=base64.b64encode(b"no frame here").decode()),
        variant("unpacks to 300 bytes", codec="zstd", image=Job.new(small, "000000000001", 1, codec="zstd").image),
        variant("image is damaged", codec="zstd", image=base64.b64encode(packed[: len(packed) // 2]).decode()),
        # Jobs that do not parse are answered too, as long as their id and origin are readable strings.
        variant("wrong type", deadline="soon"),
        variant("wrong type", shape=5),
        variant("lacks field(s): image", image=DROP),
        variant("lacks field(s): image", answered=False, image=DROP, origin=7),
    ]


def letter_key(metadata: dict) -> str | int:
    return metadata.get("id", metadata["bytes"])


def test_hand_written_bad_jobs_are_dead_lettered_with_reasons_and_the_worker_keeps_serving(stack):
    queue = stack.queue
    cases = bad_jobs()
    letters_before = len(queue.inspect.dead_letters(1000))
    for raw, _, _ in cases:
        queue.redis.lpush(queue.keys.queue, raw)
    wait_until(lambda: len(queue.inspect.dead_letters(1000)) >= letters_before + len(cases), 60, "the dead letters")
    # A dead letter keeps the job's id when it is readable, else only its size (unique among these cases).
    reason_of = {
        letter_key(letter["job"]): letter["reason"] for letter in queue.inspect.dead_letters(1000)[: len(cases)]
    }
    for raw, expected, _ in cases:
        reason = reason_of[letter_key(job_metadata(raw))]
        assert expected in reason, (raw[:60], reason)
    for _, expected, job in cases:
        if job is not None:
            answer = wait_until(lambda job=job: queue.web.take_result(job.origin, job.id), 10, "the error result")
            assert answer["success"] is False and answer["status"] == 400 and expected in answer["error"]
    assert stack.worker.process.poll() is None, "the worker is still running"
    assert queue.inspect.depth() == 0
    assert post_image(stack.web.url, sample_image_bytes()).status_code == 200


def test_several_web_processes_each_get_their_own_results_and_leave_none_behind(stack):
    """Two web servers (Flask, and gunicorn with two processes) share the queue and the worker."""
    second = start_web(stack.env, gunicorn=True, processes=2)
    data = sample_image_bytes()
    try:
        with PublishedResults(stack.env["REDIS_URL"], stack.env["IMAGE_QUEUE"]) as published:
            with ThreadPoolExecutor(40) as pool:
                urls = [stack.web.url, second.url] * 30
                responses = list(pool.map(lambda url: post_image(url, data), urls))
            counts = published.wait_for(60)
    finally:
        second.stop()
    assert [r.status_code for r in responses] == [200] * 60
    assert len(counts) == 60 and max(counts.values()) == 1, "each job was processed once"
    # A taken result lingers TAKEN_RESULT_TTL_MS (so that a read lost on the wire can be repeated), no longer.
    leftovers = list(stack.queue.redis.scan_iter(match=stack.queue.keys.result_prefix + "*"))
    ttls = [stack.queue.redis.pttl(key) for key in leftovers]  # -2: expired since the SCAN
    assert all(ttl == -2 or 0 < ttl <= TAKEN_RESULT_TTL_MS for ttl in ttls), "every result was taken"
    wait_until(lambda: not stack.queue.redis.exists(*leftovers) if leftovers else True, 5, "taken results to expire")


# ---- deadlines and backpressure -----------------------------------------------------------------


def test_expired_jobs_are_dropped_without_running_the_model_and_counted(stack):
    port, queue = stack.metrics_port, stack.queue
    expired_before = metric(port, "worker_jobs_total", outcome="expired")
    inference_before = metric(port, "worker_inference_seconds_count")
    jobs = [Job.new(PIXELS, "0000000001a7", timeout=-5) for _ in range(3)]  # deadline 5 s ago
    for job in jobs:
        assert queue.web.enqueue(job, 100)
    wait_until(lambda: metric(port, "worker_jobs_total", outcome="expired") >= expired_before + 3, 60, "expired count")
    wait_until(lambda: not queue.inspect.claimed(stack.worker.id), 30, "acknowledgement")
    assert metric(port, "worker_jobs_total", outcome="expired") == expired_before + 3
    assert metric(port, "worker_inference_seconds_count") == inference_before, "the model did not run"
    assert all(queue.web.take_result(job.origin, job.id) is None for job in jobs), "no result was written"


def test_full_queue_answers_503_at_once_and_a_late_request_504(redis_server):
    name = f"full-{uuid.uuid4().hex[:6]}"
    env = server_env(redis_server.url, name, MAX_QUEUE=2, REQUEST_TIMEOUT=3, RESULT_TTL=2)
    web = start_web(env)  # no worker at all
    queue = Queues.on(connect(redis_server.url), name, result_ttl=2)
    data = sample_image_bytes()
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post_image, web.url, data) for _ in range(2)]
            wait_until(lambda: queue.inspect.depth() == 2, 30, "two queued jobs")
            full = post_image(web.url, data)
            assert_json_error(full, 503, "queue full")
            assert full.headers["Retry-After"] == "1"
            assert queue.inspect.depth() == 2, "the refused job was not left in the queue"
            # A slow worker claims one of the two in time, and will finish it after its deadline.
            late = [Job.from_json(raw) for raw in queue.worker.claim_batch("late-worker", 1, 0, 1)]
            for future in waiting:
                assert_json_error(future.result(), 504, "REQUEST_TIMEOUT")
        assert queue.inspect.depth() == 0, "the job nobody had claimed was cancelled when its client got 504"
        # The late result expires within seconds (RESULT_TTL=2 here) instead of lingering.
        queue.worker.finish_batch("late-worker", [(job, {"success": True, "predictions": []}) for job in late], [])
        keys = [queue.keys.result(job.origin, job.id) for job in late]
        assert all(0 < queue.redis.pttl(key) <= 2000 for key in keys)
        wait_until(lambda: queue.redis.exists(*keys) == 0, 30, "the late results to expire")
    finally:
        web.stop()
        queue.redis.close()


# ---- bad uploads --------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` 1-bit pixels and holds none: tiny, yet huge when decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def malformed_uploads() -> list[tuple[str, dict, int, str]]:
    """(case, requests.post keyword arguments, expected status, words the message must contain)."""
    photo = sample_image_bytes()

    def file(data: bytes, name: str = "upload.bin") -> dict:
        return {"files": {"image": (name, data, "application/octet-stream")}}

    return [
        ("no image field", {"files": {"photo": ("a.jpg", photo, "image/jpeg")}}, 400, "field named 'image'"),
        ("image as a text field", {"data": {"image": "castle.jpg"}}, 400, "field named 'image'"),
        ("no body at all", {}, 400, "field named 'image'"),
        ("empty file", file(b""), 400, "empty"),
        ("not an image", file(b"this is a text file, not a photo\n" * 20, "notes.txt"), 400, "not an image"),
        ("truncated JPEG", file(photo[: len(photo) // 3], "cut.jpg"), 400, "damaged or truncated"),
        ("header only", file(photo[:200], "cut.jpg"), 400, "damaged or truncated"),
        ("12000x10000 pixels", file(png_header(12_000, 10_000), "big.png"), 400, "limit is 100,000,000"),
        ("9000x8000, too costly to decode", file(png_header(9_000, 8_000), "wide.png"), 400, "MAX_DECODE_BYTES"),
        ("decompression bomb", file(png_header(40_000, 40_000), "bomb.png"), 400, "too many pixels"),
        ("32-bit float TIFF", file(encoded(Image.new("F", (8, 8)), "TIFF"), "f.tif"), 400, "mode F"),
        ("over MAX_UPLOAD_BYTES", file(os.urandom(5_000_000), "huge.jpg"), 413, "MAX_UPLOAD_BYTES"),
    ]


@pytest.mark.parametrize("server", ["flask", "gunicorn"])
def test_malformed_uploads_get_4xx_json_and_the_next_good_request_succeeds(stack, server):
    web = stack.web if server == "flask" else start_web(stack.env, gunicorn=True)
    try:
        for case, kwargs, status, words in malformed_uploads():
            response = requests.post(web.url + "/predict", timeout=60, **kwargs)
            try:
                assert_json_error(response, status, words)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}") from None
        assert web.process.poll() is None
        good = post_image(web.url, sample_image_bytes())
        assert good.status_code == 200 and len(good.json()["predictions"]) == 5
    finally:
        if web is not stack.web:
            web.stop()


# ---- graceful shutdown of the web server --------------------------------------------------------


def test_gunicorn_sigterm_stops_taking_requests_and_finishes_those_in_flight(redis_server):
    name = f"term-{uuid.uuid4().hex[:6]}"
    web = start_web(server_env(redis_server.url, name, REQUEST_TIMEOUT=120), gunicorn=True)
    queue = Queues.on(connect(redis_server.url), name)
    data = sample_image_bytes()
    try:
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(post_image, web.url, data) for _ in range(3)]
            wait_until(lambda: queue.inspect.depth() == 3, 30, "three queued jobs")
            web.process.send_signal(signal.SIGTERM)
            wait_until(lambda: unanswered(web.url), 30, "the server to stop answering new requests")
            # Play the model worker: answer the three jobs while gunicorn is shutting down.
            jobs = [Job.from_json(raw) for raw in queue.worker.claim_batch("test-worker", 3, 0, 1)]
            queue.worker.finish_batch("test-worker", [(job, {"success": True, "predictions": []}) for job in jobs], [])
            responses = [future.result() for future in in_flight]
        assert [r.status_code for r in responses] == [200] * 3
        assert all(r.json() == {"success": True, "predictions": []} for r in responses)
        assert web.process.wait(60) == 0
    finally:
        web.stop(signal.SIGKILL)
        queue.redis.close()


def unanswered(url: str) -> bool:
    """True when a new request gets no answer: refused, or (gunicorn keeps its listening socket open in the
    worker until the worker exits) left unaccepted in the socket's backlog."""
    try:
        requests.get(url + "/healthz", timeout=2)
    except (requests.ConnectionError, requests.Timeout):
        return True
    return False


def test_redis_password_comes_from_redis_url_and_is_never_logged():
    secret = uuid.uuid4().hex
    redis_server = LocalRedis().start()
    with connect(redis_server.url) as admin:
        admin.config_set("requirepass", secret)
    url = f"redis://:{secret}@127.0.0.1:{redis_server.port}/0"
    web = None
    try:
        web = start_web(server_env(url, "auth"))
        body = requests.get(web.url + "/readyz", timeout=30).json()
        assert body["redis"] is True, "authenticated with the password from REDIS_URL"
        wrong = start_web(server_env(url.replace(secret, "wrong"), "auth"))
        try:
            assert requests.get(wrong.url + "/readyz", timeout=30).json()["redis"] is False
            assert_json_error(post_image(wrong.url, sample_image_bytes()), 503, "unavailable")
        finally:
            wrong.stop()
        # The log is what is under test here: the password must never appear in it.
        assert secret not in web.log + wrong.log and ":***@" in web.log
    finally:
        if web:
            web.stop()
        redis_server.stop()


# ---- Redis outages ------------------------------------------------------------------------------


def test_redis_outage_fails_fast_and_everything_resumes_without_restarts():
    redis_server = LocalRedis().start()  # our own, to stop and start again on the same port
    name = "outage"
    env = server_env(redis_server.url, name, BATCH_SIZE=4, BATCH_WAIT_MS=5, REQUEST_TIMEOUT=60)
    worker = web = None
    client = connect(redis_server.url)
    queue = Queues.on(client, name)
    data = sample_image_bytes()
    try:
        worker = start_worker(env)
        web = start_web(env)
        assert post_image(web.url, data).status_code == 200
        pids = (worker.process.pid, web.process.pid)
        with ThreadPoolExecutor(10) as pool:
            freeze(worker)  # let requests pile up, so that some are waiting when Redis goes away
            waiting = [pool.submit(post_image, web.url, data, timeout=50) for _ in range(10)]
            wait_until(
                lambda: queue.inspect.depth() + len(queue.inspect.claimed(worker.id)) == 10, 30, "ten queued jobs"
            )
            redis_server.stop()
            os.kill(worker.process.pid, signal.SIGCONT)
            for future in waiting:
                assert_json_error(future.result(), (503, 504))
        during = [post_image(web.url, data, timeout=50) for _ in range(3)]
        for response in during:
            assert_json_error(response, 503, "unavailable")
            assert response.headers["Retry-After"] == "1"
        ready = requests.get(web.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["redis"] is False

        redis_server.start()  # same port, empty, default config: notifications off
        wait_until(lambda: post_image(web.url, data, timeout=50).status_code == 200, 120, "a request to succeed again")
        body = wait_until(lambda: ready_body(web.url), 60, "/readyz to report a worker and notifications")
        assert body["workers"] == 1 and body["redis"] is True, "the worker registered again in the emptied Redis"
        assert set("K$") <= set(common_flags(queue.web)), "the listener re-enabled keyspace notifications"
        assert (worker.process.pid, web.process.pid) == pids
        assert worker.process.poll() is None and web.process.poll() is None
    finally:
        for child in (web, worker):
            if child:
                if child.process.poll() is None:
                    os.kill(child.process.pid, signal.SIGCONT)
                child.stop(signal.SIGKILL)
        client.close()
        redis_server.stop()


def ready_body(url: str) -> dict | None:
    body = requests.get(url + "/readyz", timeout=30).json()
    return body if body.get("ready") and body.get("wait_mode") == "notifications" else None


def test_listener_re_enables_notifications_when_its_connection_comes_back():
    """A restarted Redis forgets notify-keyspace-events; redis-py's pubsub may reconnect and resubscribe on
    its own (when Redis is back within its retry), so the listener must turn the events on again itself.
    A Redis of its own: no other listener may re-enable the events for it."""
    with LocalRedis() as server:
        redis_client = connect(server.url)
        queue = Queues.on(redis_client, "relisten", result_ttl=60)
        redis_client.config_set("notify-keyspace-events", "")
        listener = ResultListener(queue.web, "0123456789ab")
        listener.start()
        try:
            assert listener.wait_ready(5) and listener.mode == "notifications"
            redis_client.config_set("notify-keyspace-events", "")  # what a restart without persistence does
            redis_client.client_kill_filter(_type="pubsub")
            wait_until(lambda: set("K$") <= set(common_flags(queue.web)), 20, "notifications to be re-enabled")
            listener.SAFETY_POLL = listener.MAX_SAFETY_POLL = 60  # only a notification can wake the waiter now
            job = Job.new(PIXELS, "0123456789ab", 30)
            with listener.expect(job.id):
                queue.web.enqueue(job, 100)
                done = threading.Timer(0.2, lambda: finish(queue, job))
                done.start()
                assert listener.wait(job.id, time.time() + 30) == {"success": True}
        finally:
            listener.stop()
            redis_client.close()


def finish(queue: Queues, job: Job) -> None:
    queue.worker.claim_batch("w", 1, 0, 1)
    queue.worker.finish_batch("w", [(job, {"success": True})], [])


def test_listener_survives_a_redis_error_that_is_not_a_lost_connection(queue, redis_client, redis_server):
    """E.g. MASTERDOWN during a failover, or an ACL that denies PSUBSCRIBE: the listener thread must not die;
    waiting requests fall back to polling."""
    user, password = f"nosub-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    redis_client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all", "-psubscribe"]
    )
    limited = connect(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0")
    listener = ResultListener(WebQueue(limited, queue.keys.queue), "0123456789ab")
    listener.start()
    try:
        assert listener.wait_ready(5) and listener.mode == "polling"
        time.sleep(0.5)  # let it retry at least once
        assert listener._thread.is_alive()
        job = Job.new(PIXELS, "0123456789ab", 30)
        with listener.expect(job.id):
            queue.web.enqueue(job, 100)
            threading.Timer(0.1, lambda: finish(queue, job)).start()
            assert listener.wait(job.id, time.time() + 30) == {"success": True}
    finally:
        listener.stop()
        limited.close()
        redis_client.acl_deluser(user)
