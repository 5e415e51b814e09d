"""The queue protocol against a real Redis server."""

import json
import threading
import time
from collections import Counter

import numpy as np
import pytest

from imgserve.protocol import REDIS_UNAVAILABLE, DeadLetter, Job, ResultListener, ResultTimeout, connect
from imgserve.protocol.notifications import common_flags, enable_everywhere
from tools.queues import Queues

pytestmark = pytest.mark.unit

PIXELS = np.zeros((224, 224, 3), np.uint8)


def make_job(origin: str = "0123456789ab", timeout: float = 30.0) -> Job:
    return Job.new(PIXELS, origin, timeout)


def test_job_json_round_trip_and_size():
    job = make_job()
    raw = job.to_json()
    assert Job.from_json(raw) == job
    wire = json.loads(raw)
    assert set(wire) == {
        "id",
        "origin",
        "image",
        "shape",
        "dtype",
        "enqueued_at",
        "deadline",
        "attempts",
        "codec",
        "top_k",
    }
    assert wire["image"] == job.image and wire["shape"] == [224, 224, 3]
    assert len(job.image) == 200_704
    assert len(raw) < 201_000


def test_a_zstd_job_round_trips_and_is_smaller():
    pixels = np.tile(np.arange(224, dtype=np.uint8)[:, None, None], (1, 224, 3))
    job = Job.new(pixels, "0123456789ab", 30, codec="zstd")
    raw = job.to_json()
    assert json.loads(raw)["codec"] == "zstd" and len(raw) < 10_000
    assert np.array_equal(Job.from_json(raw).pixels(), pixels)


def test_a_job_without_codec_is_read_as_raw():
    wire = json.loads(make_job().to_json())
    del wire["codec"]
    job = Job.from_json(json.dumps(wire))
    assert job.codec == "raw" and np.array_equal(job.pixels(), PIXELS)


def test_a_parsed_job_with_an_odd_image_field_is_escaped_when_written_again():
    job = Job.from_json(make_job().to_json())
    job.image = 'quote " backslash \\ newline \n'
    assert Job.from_json(job.to_json()).image == job.image


@pytest.mark.parametrize(
    "raw, reason",
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object"), (b'{"id": "x"}', "lacks field")],
)
def test_unparseable_jobs_raise_job_error(raw, reason):
    from imgserve.protocol import JobError

    with pytest.raises(JobError, match=reason):
        Job.from_json(raw)


def test_three_concurrent_claimers_take_each_of_300_jobs_exactly_once(queue, redis_server):
    jobs = [make_job() for _ in range(300)]
    for job in jobs:
        assert queue.web.enqueue(job, max_queue=1000)
    taken: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        own = Queues.on(connect(redis_server.url), queue.keys.queue)
        mine = taken.setdefault(name, [])
        while True:
            batch = own.worker.claim_batch(name, size=7, wait=0.001, block=0.2)
            if not batch:
                return
            mine.extend(Job.from_json(raw).id for raw in batch)
            own.worker.finish_batch(name, [], [])

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    counts = Counter(job_id for ids in taken.values() for job_id in ids)
    assert set(counts) == {job.id for job in jobs}
    assert max(counts.values()) == 1
    assert all(taken[name] for name in taken), "every claimer got some work"
    assert queue.inspect.depth() == 0


def test_claim_is_fifo_and_moves_into_processing_list(queue, redis_client):
    jobs = [make_job() for _ in range(5)]
    for job in jobs:
        queue.web.enqueue(job, 100)
    batch = queue.worker.claim_batch("w", size=3, wait=0, block=1)
    assert sorted(Job.from_json(raw).id for raw in batch) == sorted(job.id for job in jobs[:3])
    assert redis_client.llen(queue.keys.processing("w")) == 3
    assert queue.inspect.depth() == 2


def command_calls(redis_client, command: str) -> int:
    return redis_client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_job_that_comes_alone_is_claimed_in_one_round_trip_and_a_backlog_in_two(queue, redis_client):
    """BLMOVE learns, in the same round trip, how many more jobs wait at each level (LLEN): none, no second
    trip. A backlog: the first trip reads the levels' lengths, the second moves one job each (LMOVE), no BLMOVE."""
    jobs = [make_job() for _ in range(3)]
    threading.Timer(0.2, lambda: queue.web.enqueue(jobs[0], 100)).start()
    moves_before = command_calls(redis_client, "lmove")
    batch = queue.worker.claim_batch("w", size=8, wait=0, block=2)
    assert [Job.from_json(raw).id for raw in batch] == [jobs[0].id]
    assert command_calls(redis_client, "lmove") == moves_before, "no LMOVE for a job that came alone"
    for job in jobs[1:]:
        queue.web.enqueue(job, 100)
    blocks_before = command_calls(redis_client, "blmove")
    batch = queue.worker.claim_batch("w", size=8, wait=0, block=2)
    assert [Job.from_json(raw).id for raw in batch] == [job.id for job in jobs[1:]], "oldest first"
    assert command_calls(redis_client, "lmove") == moves_before + 2, "one LMOVE per job waiting"
    assert command_calls(redis_client, "blmove") == blocks_before, "no blocking with jobs waiting"


def test_jobs_of_another_producer_are_claimed_as_a_batch(queue, redis_client):
    # Another producer's jobs (fields in another order) are claimed as ours are.
    raws = [json.dumps({"id": str(i), "image": "x" * 600, "enqueued_at": time.time() + 60}) for i in range(3)]
    redis_client.lpush(queue.keys.queue, *raws)
    assert len(queue.worker.claim_batch("w", size=8, wait=0, block=1)) == 3


def test_claim_waits_for_more_jobs_up_to_batch_wait(queue):
    queue.web.enqueue(make_job(), 100)
    threading.Timer(0.05, lambda: queue.web.enqueue(make_job(), 100)).start()
    batch = queue.worker.claim_batch("w", size=4, wait=0.5, block=1)
    assert len(batch) == 2


def test_results_expire_after_the_deadline_and_soon_after_they_are_taken(queue, redis_client):
    job = make_job(timeout=20)
    queue.web.enqueue(job, 100)
    queue.worker.claim_batch("w", 1, 0, 1)
    queue.worker.finish_batch("w", [(job, {"success": True, "predictions": []})], [])
    key = queue.keys.result(job.origin, job.id)
    assert 20 <= redis_client.ttl(key) <= 25, "kept until a few seconds after the deadline, not RESULT_TTL (60)"
    assert redis_client.llen(queue.keys.processing("w")) == 0
    assert queue.web.take_result(job.origin, job.id) == {"success": True, "predictions": []}
    # Taken: read again (a retry after a lost reply) it is the same, and it is gone within 2 s.
    assert queue.web.take_result(job.origin, job.id) == {"success": True, "predictions": []}
    assert 0 < redis_client.pttl(key) <= 2000


def test_a_late_result_expires_seconds_after_its_deadline(queue, redis_client):
    job = make_job(timeout=-1)  # its client gave up a second ago
    queue.worker.finish_batch("w", [(job, {"success": True, "predictions": []})], [])
    assert 0 < redis_client.ttl(queue.keys.result(job.origin, job.id)) <= 5


def test_a_write_refused_by_a_full_redis_leaves_the_batch_claimed(queue, redis_client):
    job = make_job()
    queue.web.enqueue(job, 100)
    queue.worker.claim_batch("w", 1, 0, 1)
    answer = {"success": True, "predictions": []}
    redis_client.config_set("maxmemory", 1)  # below what is in use: Redis refuses writes (noeviction)
    try:
        with pytest.raises(REDIS_UNAVAILABLE):  # the worker retries it, as for a lost connection
            queue.worker.finish_batch("w", [(job, answer)], [DeadLetter(b"{", "bad JSON")])
        assert redis_client.llen(queue.keys.processing("w")) == 1, "the batch is still claimed"
    finally:
        redis_client.config_set("maxmemory", 0)
    queue.worker.finish_batch("w", [(job, answer)], [])
    assert redis_client.llen(queue.keys.processing("w")) == 0
    assert queue.web.take_result(job.origin, job.id) == answer


def test_bad_job_is_dead_lettered_and_its_client_answered(queue):
    job = make_job()
    bad_image = json.dumps({"id": job.id, "origin": job.origin, "image": "@@"})
    queue.redis.lpush(queue.keys.queue, bad_image, b"{")
    assert len(queue.worker.claim_batch("w", 2, 0, 1)) == 2
    queue.worker.finish_batch(
        "w", [], [DeadLetter(bad_image, "image is not valid base64"), DeadLetter(b"{", "bad JSON")]
    )
    assert queue.redis.llen(queue.keys.processing("w")) == 0
    letters = queue.inspect.dead_letters()
    assert {letter["reason"] for letter in letters} == {"image is not valid base64", "bad JSON"}
    result = queue.web.take_result(job.origin, job.id)
    assert result["success"] is False and result["status"] == 400


def test_enqueue_refuses_when_queue_is_full(queue):
    assert queue.web.enqueue(make_job(), max_queue=2)
    assert queue.web.enqueue(make_job(), max_queue=2)
    assert not queue.web.enqueue(make_job(), max_queue=2)
    assert queue.inspect.depth() == 2


def test_reaper_requeues_a_dead_workers_jobs_at_the_head(queue, redis_client):
    for _ in range(3):
        queue.web.enqueue(make_job(), 100)
    queue.worker.heartbeat("dead-worker", 30)
    claimed = queue.worker.claim_batch("dead-worker", 2, 0, 1)
    queue.web.enqueue(make_job(), 100)
    assert queue.worker.reap() == (0, 0, 0)  # heartbeat still alive
    queue.worker.heartbeat("dead-worker", ttl=0.2)  # its last heartbeat
    time.sleep(0.3)
    assert queue.worker.reap() == (1, 2, 0)
    assert redis_client.llen(queue.keys.processing("dead-worker")) == 0
    assert not redis_client.sismember(queue.keys.workers, "dead-worker")
    again = [Job.from_json(raw) for raw in queue.worker.claim_batch("w2", 2, 0, 1)]
    assert {job.id for job in again} == {Job.from_json(raw).id for raw in claimed}
    assert all(job.attempts == 1 for job in again)


def test_job_is_dead_lettered_after_max_attempts_and_client_gets_error(queue):
    job = make_job()
    queue.web.enqueue(job, 100)
    for attempt in range(1, 4):
        queue.worker.heartbeat(f"crashy{attempt}", 0.05)
        assert len(queue.worker.claim_batch(f"crashy{attempt}", 1, 0, 1)) == 1
        time.sleep(0.1)
        workers, requeued, dead_lettered = queue.worker.reap()
        assert workers == 1
        assert (requeued, dead_lettered) == ((1, 0) if attempt < 3 else (0, 1))
    assert queue.inspect.depth() == 0
    [letter] = queue.inspect.dead_letters()
    assert "MAX_ATTEMPTS=3" in letter["reason"] and letter["job"]["id"] == job.id
    assert "image" not in letter["job"] and letter["job"]["bytes"] > 200_000  # the size, not the image
    result = queue.web.take_result(job.origin, job.id)
    assert result["success"] is False and "delivered 3 times" in result["error"]


def test_unregister_returns_claimed_jobs_without_counting_an_attempt(queue):
    queue.web.enqueue(make_job(), 100)
    queue.worker.heartbeat("w", 5)
    queue.worker.claim_batch("w", 1, 0, 1)
    queue.worker.unregister("w")
    assert len(queue.inspect.live_worker_models()) == 0
    [raw] = queue.worker.claim_batch("w2", 1, 0, 1)
    assert Job.from_json(raw).attempts == 0


def test_enable_notifications_adds_only_needed_flags(queue, redis_client):
    redis_client.config_set("notify-keyspace-events", "Ex")
    assert enable_everywhere(queue.web)
    assert set(common_flags(queue.web)) == set("KEx$")


def deliver_later(queue: Queues, job: Job, delay: float) -> None:
    def work() -> None:
        queue.worker.claim_batch("w", 1, 0, 1)
        queue.worker.finish_batch("w", [(job, {"success": True, "n": 1})], [])

    threading.Timer(delay, work).start()


def test_waiter_is_woken_by_notification(queue, redis_client):
    redis_client.config_set("notify-keyspace-events", "")
    listener = ResultListener(queue.web, "0123456789ab")
    listener.start()
    try:
        assert listener.wait_ready(5) and listener.mode == "notifications"
        listener.SAFETY_POLL = listener.MAX_SAFETY_POLL = 30  # only a notification can wake it in time
        job = make_job()
        with listener.expect(job.id):
            queue.web.enqueue(job, 100)
            deliver_later(queue, job, 0.1)
            started = time.monotonic()
            assert listener.wait(job.id, time.time() + 10) == {"success": True, "n": 1}
            assert time.monotonic() - started < 5
    finally:
        listener.stop()


def test_polling_fallback_delivers_with_notifications_off(queue, redis_client):
    redis_client.config_set("notify-keyspace-events", "")
    listener = ResultListener(queue.web, "0123456789ab", use_notifications=False)
    listener.start()
    assert listener.mode == "polling"
    job = make_job()
    with listener.expect(job.id):
        queue.web.enqueue(job, 100)
        deliver_later(queue, job, 0.1)
        assert listener.wait(job.id, time.time() + 10) == {"success": True, "n": 1}
    assert common_flags(queue.web) == ""


def test_wait_times_out(queue):
    listener = ResultListener(queue.web, "0123456789ab", use_notifications=False)
    job = make_job()
    with listener.expect(job.id), pytest.raises(ResultTimeout):
        listener.wait(job.id, time.time() + 0.2)


@pytest.mark.parametrize("flags, expected", [("K$", "notifications"), ("", "polling")])
def test_without_config_command_the_listener_probes_for_events(flags, expected):
    from imgserve.launch.local_redis import LocalRedis

    args = ("--rename-command", "CONFIG", "", "--notify-keyspace-events", flags)
    with LocalRedis(extra_args=args) as server:
        queue = Queues.on(connect(server.url), "noconfig")
        listener = ResultListener(queue.web, "0123456789ab")
        listener.start()
        try:
            assert listener.wait_ready(10)
            deadline = time.monotonic() + 10
            while listener.mode != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert listener.mode == expected
            job = make_job()
            with listener.expect(job.id):
                queue.web.enqueue(job, 100)
                deliver_later(queue, job, 0.05)
                assert listener.wait(job.id, time.time() + 10) == {"success": True, "n": 1}
        finally:
            listener.stop()


@pytest.mark.parametrize(
    "text",
    [
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"image":"AAAA"}',
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"image":"AA\\"AA"}',
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"image":"AA\\u0041A"}',
        '{"image":"first","id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"image":"last"}',
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"x":{"image":"nested"},"image":"top"}',
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","deadline":1,"note":",\\"image\\":\\"x","image":"y"}',
        '{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","origin":"0123456789ab","shape":[1],"dtype":"uint8","image":"AAAA","deadline":1}',
    ],
)
def test_the_image_last_shortcut_reads_every_job_as_json_loads_does(text):
    expected = json.loads(text)
    job = Job.from_json(text.encode())
    assert (job.id, job.image, job.deadline) == (expected["id"], expected["image"], expected["deadline"])


def wire_with(**changes: object) -> str:
    return json.dumps({**json.loads(make_job().to_json()), **changes})


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"id": "\ud800"}, "malformed 'id'"),  # parses as JSON, cannot be encoded into a key
        ({"id": "a" * 31 + ":"}, "malformed 'id'"),
        ({"id": "a" * 31 + "*"}, "malformed 'id'"),
        ({"id": "A" * 32}, "malformed 'id'"),
        ({"id": "a" * 32 + "\n"}, "malformed 'id'"),
        ({"origin": "0" * 13}, "malformed 'origin'"),
        ({"origin": "web:1"}, "malformed 'origin'"),
        ({"origin": "Submitted"}, "malformed 'origin'"),
        ({"dtype": "uint8; drop"}, "malformed 'dtype'"),
        ({"codec": "png"}, "unknown image codec 'png'"),
        ({"codec": 5}, "unknown image codec int"),
    ],
)
def test_fields_the_web_would_not_mint_are_refused_at_parse(changes, reason):
    from imgserve.protocol import JobError

    with pytest.raises(JobError, match=reason):
        Job.from_json(wire_with(**changes).encode())


def test_the_fields_the_web_mints_parse():
    job = Job.from_json(wire_with(origin="submitted", codec="zstd2", dtype="float32").encode())
    assert (job.origin, job.codec, job.dtype) == ("submitted", "zstd2", "float32")


def test_a_dead_letter_keeps_no_id_or_origin_that_cannot_be_part_of_a_key():
    bad = [wire_with(id="\ud800"), wire_with(id="x:*"), wire_with(origin="0" * 200), wire_with(codec="\ud800")]
    for raw in bad:
        letter = DeadLetter(raw.encode(), "bad")
        assert letter.reply_to is None or letter.metadata.get("codec") is None
        assert all(v.isascii() for v in letter.metadata.values() if isinstance(v, str)), letter.metadata
    assert DeadLetter(wire_with(id="x:*").encode(), "bad").reply_to is None
    assert DeadLetter(wire_with(origin="0" * 200).encode(), "bad").reply_to is None
    good = make_job()
    assert DeadLetter(good.to_json(), "bad").reply_to == (good.origin, good.id)


def test_release_never_answers_or_keeps_a_foreign_id(queue, redis_client):
    """The Lua side applies the same rules: a job naming a foreign id is dead-lettered, unanswered."""
    foreign = json.loads(make_job().to_json()) | {"id": "x:*"}
    raw = json.dumps(foreign)
    redis_client.rpush(queue.keys.processing("w"), raw)
    prefix = queue.keys.result_prefix
    # Declared by hand, as a careless caller might: the script must still not write it.
    queue.worker._release(
        keys=[
            queue.keys.processing("w"),
            *queue.keys.levels.values(),
            queue.keys.dead,
            f"{prefix}{foreign['origin']}:x:*",
        ],
        args=[*queue.worker._release_args(queue.keys), "w", 1, "test"],
    )
    assert queue.inspect.depth() == 0 and redis_client.keys(prefix + "*") == []
    [letter] = queue.inspect.dead_letters()
    assert letter["reason"] == "job has a malformed id" and "id" not in letter["job"]


def test_a_result_that_cannot_be_written_dead_letters_its_job_and_the_rest_are_published(queue, redis_client):
    jobs = [make_job() for _ in range(3)]
    queue.web.enqueue_many(jobs, 100)
    assert len(queue.worker.claim_batch("w", 3, 0, 1)) == 3
    answer = {"success": True, "predictions": []}
    unserialisable = {"success": True, "probability": np.float32(0.5)}  # JSON cannot carry it
    letters = queue.worker.finish_batch("w", [(jobs[0], answer), (jobs[1], unserialisable), (jobs[2], answer)], [])
    assert [letter.metadata["id"] for letter in letters] == [jobs[1].id]
    assert redis_client.llen(queue.keys.processing("w")) == 0
    assert (
        queue.web.take_result(jobs[0].origin, jobs[0].id) == answer == queue.web.take_result(jobs[2].origin, jobs[2].id)
    )
    failed = queue.web.take_result(jobs[1].origin, jobs[1].id)
    assert failed["status"] == 500 and "its result cannot be written (TypeError" in failed["error"]
    [letter] = queue.inspect.dead_letters()
    assert letter["job"]["id"] == jobs[1].id and "TypeError" in letter["reason"]


def test_a_worker_claim_into_a_slot_that_holds_jobs_releases_it_instead(queue, redis_client):
    held, waiting = make_job(), make_job()
    queue.web.enqueue(held, 100)
    assert len(queue.worker.claim_batch("w", 1, 0, 1, slot=2)) == 1  # never acknowledged
    queue.web.enqueue(waiting, 100)
    assert queue.worker.claim_batch("w", 1, 0, 1, slot=2, only_into_empty=True) == []
    assert redis_client.llen(queue.keys.processing("w", 2)) == 0
    requeued = [Job.from_json(raw) for raw in redis_client.lrange(queue.keys.queue, 0, -1)]
    assert {job.id for job in requeued} == {held.id, waiting.id}


def test_the_reaper_reaps_each_dead_worker_even_when_one_fails(queue, redis_client, monkeypatch):
    jobs = [make_job(), make_job()]
    for worker, job in zip(("a-ghost", "b-ghost"), jobs, strict=True):  # sorted: a-ghost is reaped first
        redis_client.sadd(queue.keys.workers, worker)
        redis_client.rpush(queue.keys.processing(worker), job.to_json())
    reap_worker = queue.worker._reap_worker

    def failing_for_a(keys, worker):
        if worker == "a-ghost":
            raise RuntimeError("injected: this worker cannot be reaped")
        return reap_worker(keys, worker)

    monkeypatch.setattr(queue.worker, "_reap_worker", failing_for_a)
    assert queue.worker.reap() == (1, 1, 0)
    assert [Job.from_json(raw).id for raw in redis_client.lrange(queue.keys.queue, 0, -1)] == [jobs[1].id]
    assert redis_client.smembers(queue.keys.workers) == {b"a-ghost"}, "tried again next round"
    monkeypatch.undo()
    assert queue.worker.reap() == (1, 1, 0) and queue.inspect.depth() == 2
