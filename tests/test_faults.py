"""Lose nothing, for real: a command or its reply lost at each step of the job path, malformed jobs in
Redis, and the dead-letter bound.

The project's own Worker runs in-process against a real Redis, through a TCP proxy that drops a
connection at the chosen moment (tests/support/fault_proxy.py). The model is a stand-in that labels each image
by the number written into its pixels and counts the images it saw, so the tests can tell that each
job was run exactly once and answered with its own result.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from imgserve.protocol import SLOTS, Job, WorkerQueue, connect
from tests.support.fault_proxy import FaultProxy
from tests.support.workers import MALFORMED, NumberedModel, RunningWorker, good_wire, numbered_job, worker_config
from tools.processes import Child, server_env, wait_until
from tools.queues import Queues


@pytest.fixture
def proxy(redis_server):
    proxy = FaultProxy(redis_server.port)
    yield proxy
    proxy.close()


def results(queue: Queues, jobs: list[Job]) -> list[dict | None]:
    raws = queue.redis.mget([queue.keys.result(job.origin, job.id) for job in jobs])
    return [None if raw is None else json.loads(raw) for raw in raws]


def assert_all_answered_once(queue: Queues, jobs: list[Job], model: NumberedModel, dead: int = 0) -> None:
    """Every job ran exactly once and got its own result; nothing is left claimed; `dead` dead letters."""
    assert model.seen == Counter(range(len(jobs))), "each job ran exactly once"
    labels = [result["predictions"][0]["label"] for result in results(queue, jobs)]
    assert labels == [f"image-{n}" for n in range(len(jobs))]
    assert queue.inspect.depth() == 0
    assert len(queue.inspect.dead_letters()) == dead, "each bad job dead-lettered once"


def script_token(queue: WorkerQueue, name: str) -> bytes:
    return getattr(queue, name).sha.encode()


# What is lost: (the bytes that identify its command on the wire, bad jobs queued first so that it is used)
WORKER_STEPS = {
    "claim: BLMOVE": (lambda q: b"BLMOVE", 0),
    "claim: LMOVE": (lambda q: b"$5\r\nLMOVE\r\n", 0),  # the framing keeps BLMOVE from matching
    "publish: SET results": (lambda q: q.keys.result_prefix.encode(), 0),
    "acknowledge: DEL": (lambda q: b"$3\r\nDEL\r\n", 0),
    "acknowledge with dead letters: ACK script": (lambda q: script_token(q, "_ack"), 1),
}


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["before", "after", "mid"])
@pytest.mark.parametrize("step", list(WORKER_STEPS))
def test_a_connection_lost_at_any_step_of_a_batch_loses_no_job_and_runs_none_twice(
    redis_server, proxy, queue_name, step, phase
):
    direct = Queues.on(connect(redis_server.url), queue_name)
    token, bad = WORKER_STEPS[step]
    for _ in range(bad):
        direct.redis.lpush(direct.keys.queue, b"not a job")
    jobs = [numbered_job(n) for n in range(10)]
    # A worker blocks (BLMOVE) only when no level has jobs waiting: for that step the jobs come once it is idle.
    idle_first = step == "claim: BLMOVE"
    for job in [] if idle_first else jobs:
        assert direct.web.enqueue(job, 100)
    model = NumberedModel()
    with RunningWorker(worker_config(proxy.url, queue_name), model) as running:
        proxy.arm(token(running.queue), phase)
        if idle_first:
            threading.Timer(0.05, lambda: [direct.web.enqueue(job, 100) for job in jobs]).start()
        wait_until(lambda: all(results(direct, jobs)), 30, "a result for every job")
        wait_until(proxy.fired.is_set, 5, "the fault injected")
        worker_id = running.worker.id
    assert_all_answered_once(direct, jobs, model, dead=bad)
    assert not any(direct.redis.exists(key) for key in direct.keys.processing_lists(worker_id))


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["before", "after", "mid"])
def test_a_lost_reply_while_requeueing_a_failed_batch_loses_no_job(redis_server, proxy, queue_name, phase):
    direct = Queues.on(connect(redis_server.url), queue_name)
    jobs = [numbered_job(n) for n in range(6)]
    for job in jobs:
        direct.web.enqueue(job, 100)
    model = NumberedModel()
    model.failures = 1
    config = worker_config(proxy.url, queue_name)
    running = RunningWorker(config, model)
    proxy.arm(script_token(running.queue, "_release"), phase)
    with running:
        wait_until(lambda: all(results(direct, jobs)), 30, "a result for every job")
    assert proxy.fired.is_set()
    assert_all_answered_once(direct, jobs, model)


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["before", "after", "mid"])
def test_a_lost_reply_to_lpush_queues_the_job_exactly_once(redis_server, proxy, queue_name, phase):
    through_proxy = Queues.on(connect(proxy.url), queue_name)
    job = numbered_job(1)
    proxy.arm(b"LPUSH", phase)
    assert through_proxy.web.enqueue(job, 100)
    assert proxy.fired.is_set()
    assert connect(redis_server.url).lrange(through_proxy.keys.queue, 0, -1) == [job.to_json()]


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["before", "after", "mid"])
def test_a_lost_reply_to_taking_a_result_still_returns_it(redis_server, proxy, queue_name, phase):
    through_proxy = Queues.on(connect(proxy.url), queue_name)
    key = through_proxy.keys.result("web", "job1")
    connect(redis_server.url).set(key, json.dumps({"success": True}), ex=60)
    proxy.arm(b"GETEX", phase)
    assert through_proxy.web.take_result("web", "job1") == {"success": True}
    assert proxy.fired.is_set()


# ---- malformed jobs -----------------------------------------------------------------------------


@pytest.mark.unit
def test_malformed_jobs_are_dead_lettered_without_their_image_and_the_worker_goes_on(
    redis_server, queue_name, redis_client
):
    direct = Queues.on(redis_client, queue_name)
    redis_client.lpush(direct.keys.queue, *MALFORMED.values())
    good = [numbered_job(n) for n in range(2)]
    for job in good:
        direct.web.enqueue(job, 100)
    model = NumberedModel()
    config = worker_config(redis_server.url, queue_name, MAX_JOB_BYTES=262_144)
    before = REGISTRY.get_sample_value("worker_jobs_total", {"outcome": "dead_lettered"})
    with RunningWorker(config, model):
        wait_until(lambda: all(results(direct, good)), 30, "the good jobs' results")
        wait_until(
            lambda: sum(direct.inspect.dead_letter_counts()) == len(MALFORMED), 10, "every bad job dead-lettered"
        )
    after = REGISTRY.get_sample_value("worker_jobs_total", {"outcome": "dead_lettered"})
    assert after - before == len(MALFORMED)
    letters = direct.inspect.dead_letters()
    assert all(set(letter) == {"reason", "worker", "at", "job"} for letter in letters)
    assert all("image" not in letter["job"] and letter["job"]["bytes"] > 0 for letter in letters)
    reasons = " | ".join(letter["reason"] for letter in letters)
    for expected in ("finite number", "'shape'", "'id'", "'image'", "not a JSON object", "MAX_JOB_BYTES", "'attempts'"):
        assert expected in reasons, (expected, reasons)
    assert model.seen == Counter({0: 1, 1: 1})


@pytest.mark.unit
def test_the_reaper_dead_letters_what_it_cannot_requeue_and_forgets_the_dead_worker(queue, redis_client):
    good = [numbered_job(n) for n in range(2)]
    poison = [MALFORMED["infinite attempts"], '{"id": "nan", "attempts": NaN}', "x" * 2_000_000]
    redis_client.sadd(queue.keys.workers, "ghost")  # registered, no heartbeat: dead
    redis_client.rpush(queue.keys.processing("ghost", 0), good[0].to_json(), *poison[:2])
    redis_client.rpush(queue.keys.processing("ghost", SLOTS - 1), poison[2], good[1].to_json())
    assert queue.worker.reap() == (1, 2, 3)
    for _ in range(2):
        assert queue.worker.reap() == (0, 0, 0)
    assert queue.inspect.depth() == 2 and not redis_client.sismember(queue.keys.workers, "ghost")
    assert not any(redis_client.exists(key) for key in queue.keys.processing_lists("ghost"))
    assert {Job.from_json(raw).id for raw in redis_client.lrange(queue.keys.queue, 0, -1)} == {j.id for j in good}
    assert len(queue.inspect.dead_letters()) == 3


@pytest.mark.unit
def test_dead_letters_are_bounded_by_dead_letter_max(redis_server, queue_name, redis_client):
    direct = Queues.on(redis_client, queue_name)
    redis_client.lpush(direct.keys.queue, *(b"not json %d" % n for n in range(12)))
    sentinel = numbered_job(0)
    direct.web.enqueue(sentinel, 100)  # queued last: answered once every bad job before it was handled
    with RunningWorker(worker_config(redis_server.url, queue_name, DEAD_LETTER_MAX=5), NumberedModel()):
        wait_until(lambda: all(results(direct, [sentinel])), 30, "the sentinel's result")
    assert sum(direct.inspect.dead_letter_counts()) == 5
    assert all("not valid JSON" in letter["reason"] for letter in direct.inspect.dead_letters())


@pytest.mark.system
def test_kill_9_while_a_prefetched_batch_waits_loses_nothing(redis_server, queue_name):
    """A worker whose model is busy with one batch while the next waits, decoded, in its own slot."""
    direct = Queues.on(connect(redis_server.url), queue_name)
    jobs = [numbered_job(n) for n in range(6)]
    for job in jobs:
        direct.web.enqueue(job, 100)
    env = server_env(redis_server.url, queue_name, BATCH_SIZE=2, HEARTBEAT_TTL=2)
    slow = Child([sys.executable, "-m", "tools.standin", "--seconds-per-image", "30"], env)
    try:
        worker = wait_until(lambda: [w.decode() for w in direct.redis.smembers(direct.keys.workers)], 60, "a worker")
        wait_until(lambda: len(direct.inspect.claimed(worker[0])) == 4, 30, "one batch in the model and one prefetched")
        assert direct.inspect.depth() == 2, "no more than PREFETCH_BATCHES=1 batch waits for the model"
        slow.process.kill()
        slow.process.wait(30)
    finally:
        slow.stop()
    model = NumberedModel()
    with RunningWorker(worker_config(redis_server.url, queue_name, HEARTBEAT_TTL=2, REAP_INTERVAL=0.5), model):
        wait_until(lambda: all(results(direct, jobs)), 30, "a result for every job")
    assert_all_answered_once(direct, jobs, model)
    assert direct.inspect.claimed(worker[0]) == [] and not direct.redis.sismember(direct.keys.workers, worker[0])


# ---- a publish that raises ------------------------------------------------------------------------


def foreign(**changes: object) -> str:
    """A well-formed job but for fields the web would not mint (json.dumps escapes a lone surrogate)."""
    return json.dumps(good_wire(**changes))


@pytest.mark.unit
def test_jobs_with_ids_or_origins_the_web_would_not_mint_are_dead_lettered_and_their_batch_answered(
    redis_server, queue_name, redis_client
):
    direct = Queues.on(redis_client, queue_name)
    bad = [foreign(id="\ud800"), foreign(id="a" * 31 + ":"), foreign(id="a" * 31 + "*"), foreign(origin="0" * 13)]
    good = [numbered_job(n) for n in range(4)]
    # Interleaved, oldest first, so that every batch of 4 holds bad and good jobs.
    redis_client.lpush(
        direct.keys.queue, *(raw for pair in zip(bad, good, strict=True) for raw in (pair[0], pair[1].to_json()))
    )
    model = NumberedModel()
    with RunningWorker(worker_config(redis_server.url, queue_name), model) as running:
        wait_until(lambda: all(results(direct, good)), 30, "the good jobs' results")
        wait_until(lambda: sum(direct.inspect.dead_letter_counts()) == len(bad), 10, "every bad job dead-lettered")
        later = numbered_job(4)
        direct.web.enqueue(later, 100)
        wait_until(lambda: all(results(direct, [later])), 30, "a later job's result: the worker keeps serving")
        assert direct.inspect.claimed(running.worker.id) == []
    assert_all_answered_once(direct, [*good, later], model, dead=len(bad))
    reasons = sorted(letter["reason"] for letter in direct.inspect.dead_letters())
    assert reasons == ["job has a malformed 'id': it must be 32 lowercase hex digits"] * 3 + [
        "job has a malformed 'origin': it must be 12 lowercase hex digits or 'submitted'"
    ]
    assert all("id" not in letter["job"] or letter["job"]["id"].isalnum() for letter in direct.inspect.dead_letters())


def raising_once(method, error: Exception):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return method(*args, **kwargs)

    return wrapper


@pytest.mark.unit
@pytest.mark.parametrize("release_fails_too", [False, True])
def test_a_publish_that_raises_for_any_reason_loses_no_job(redis_server, queue_name, redis_client, release_fails_too):
    """The first batch's publish raises something unforeseen (and, in the second case, so does returning it to
    the queue). Then more batches than the worker has slots follow: none may be claimed into the full slot."""
    direct = Queues.on(redis_client, queue_name)
    waves = [[numbered_job(4 * w + i) for i in range(4)] for w in range(SLOTS + 2)]
    model = NumberedModel()
    with RunningWorker(worker_config(redis_server.url, queue_name), model) as running:
        queue = running.queue
        queue.finish_batch = raising_once(queue.finish_batch, RuntimeError("injected publish failure"))
        if release_fails_too:
            queue.release = raising_once(queue.release, RuntimeError("injected release failure"))
        for wave in waves:
            assert direct.web.enqueue_many(wave, 100)
            later = waves[1:] if release_fails_too else waves
            wait_until(lambda wave=wave: wave is waves[0] or all(results(direct, wave)), 30, "the wave's results")
        wait_until(lambda: all(results(direct, [job for wave in later for job in wave])), 30, "every result")
        held = [Job.from_json(raw).id for raw in direct.inspect.claimed(running.worker.id)]
    first = {job.id for job in waves[0]}
    answered = {job.id for job, result in zip(waves[0], results(direct, waves[0]), strict=True) if result}
    requeued = {Job.from_json(raw).id for raw in redis_client.lrange(direct.keys.queue, 0, -1)}
    if release_fails_too:
        assert set(held) == first, "the first batch stayed in its slot while the worker served the others"
        assert requeued == first and not answered, "and went back to the queue when the worker stopped"
    else:
        assert answered == first and not held and not requeued
    assert direct.inspect.dead_letters() == []
