"""Submitted jobs' tickets and results in a real Redis: who owns a job, what a failed one says, each API key's
share of the queue (HOLD), and keys holding something no part of the service wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgserve.protocol import SUBMITTED, Job
from imgserve.protocol.keys import owner_key, ticket_key
from imgserve.protocol.queue import UNREADABLE_RESULT

pytestmark = pytest.mark.unit

ALICE, BOB = "a1" * 8, "b2" * 8


def submitted(owner: str = ALICE, timeout: float = 60.0) -> Job:
    job = Job.new(np.zeros((224, 224, 3), np.uint8), SUBMITTED, timeout, "raw")
    job.owner = owner
    return job


def write_result(queue, job_id: str, value: bytes | dict) -> None:
    raw = json.dumps(value) if isinstance(value, dict) else value
    queue.redis.set(queue.keys.result(SUBMITTED, job_id), raw, ex=60)


def test_only_its_owner_sees_or_cancels_a_job_and_the_worker_keeps_the_owner(queue):
    job = submitted()
    assert queue.web.submit(job, 100)
    assert queue.web.job_status(job.id, BOB) is None and queue.web.cancel_submitted(job.id, BOB) == -1
    assert queue.web.job_status(job.id, ALICE) == {"status": "queued"}
    assert queue.worker.take_tickets([Job.from_json(job.to_json())]) == set()  # as the worker reads it from the queue
    assert queue.redis.get(ticket_key(queue.name, job.id)) == f"running 0 {ALICE}".encode()
    assert queue.web.job_status(job.id, BOB) is None and queue.web.cancel_submitted(job.id, BOB) == -1
    assert (
        queue.web.job_status(job.id, ALICE) == {"status": "running"} and queue.web.cancel_submitted(job.id, ALICE) == 0
    )


def test_the_owner_cancels_a_queued_job_and_without_keys_everyone_is_one_owner(queue):
    mine, open_job = submitted(), submitted(owner="")
    assert queue.web.submit(mine, 100) and queue.web.submit(open_job, 100)
    assert queue.web.cancel_submitted(mine.id, ALICE) == 1 and queue.web.job_status(mine.id, ALICE) is None
    assert queue.web.job_status(open_job.id) == {"status": "queued"} and queue.web.cancel_submitted(open_job.id) == 1
    assert queue.worker.take_tickets([mine, open_job]) == {mine.id, open_job.id}


def test_a_failed_job_says_failed_with_its_error_never_an_http_status(queue):
    job = submitted()
    queue.web.submit(job, 100)
    error = "job failed: worker w1 stopped sending heartbeats; delivered 1 times (MAX_ATTEMPTS=1)"
    write_result(queue, job.id, {"success": False, "status": 500, "error": error})
    assert queue.web.job_status(job.id, ALICE) == {"status": "failed", "error": error}


def test_a_done_job_keeps_its_predictions_and_model(queue):
    job = submitted()
    queue.web.submit(job, 100)
    answer = {"success": True, "predictions": [{"label": "castle", "probability": 0.5}], "model": "m", "id": "x"}
    write_result(queue, job.id, answer)
    assert queue.web.job_status(job.id, ALICE) == {"status": "done", "predictions": answer["predictions"], "model": "m"}


@pytest.mark.parametrize(
    "ticket",
    [b"\xff\xfe queued", b"queued", b"queued 0", b"queued x " + ALICE.encode(), b"queued 7 " + ALICE.encode(),
     b"done 0 " + ALICE.encode(), b"queued 0 " + ALICE.encode() + b" a-model extra",
     b"queued 0 " + ALICE.encode() + b" b{d}", b"\n"],
)  # fmt: skip
def test_an_unreadable_ticket_is_an_unknown_job_and_is_logged(queue, ticket, caplog):
    job_id = submitted().id
    queue.redis.set(ticket_key(queue.name, job_id), ticket, ex=60)
    assert queue.web.job_status(job_id, ALICE) is None
    assert "unreadable ticket" in caplog.text
    assert queue.web.cancel_submitted(job_id, ALICE) in (-1, 1)  # never "running": no 409 for a job it cannot see


@pytest.mark.parametrize(
    "result",
    [b"\xff\xfe", b"not json", b"[1, 2]", b'"done"', b"{}", b'{"success": "yes"}',
     b'{"success": true, "predictions": 3}', b'{"success": 1, "predictions": []}', b'{"success": false}',
     b'{"success": false, "error": 5}'],
)  # fmt: skip
def test_an_unreadable_result_is_a_failure_and_is_logged(queue, result, caplog):
    job = submitted()
    queue.web.submit(job, 100)
    write_result(queue, job.id, result)
    assert queue.web.job_status(job.id, ALICE) == {"status": "failed", "error": UNREADABLE_RESULT}
    assert queue.web.take_result(SUBMITTED, job.id) == {"success": False, "error": UNREADABLE_RESULT, "status": 502}
    assert "unreadable result" in caplog.text


@pytest.mark.parametrize("status", ["500", 99, 600, True, None, 1.5])
def test_a_failed_result_with_a_wrong_status_is_answered_as_500(queue, status):
    write_result(queue, "j1", {"success": False, "error": "boom", "status": status})
    assert queue.web.take_result(SUBMITTED, "j1") == {"success": False, "error": "boom", "status": 500}


def test_each_owner_holds_at_most_its_share_until_it_releases_or_the_deadline_passes(queue):
    first, second, third = submitted(), submitted(), submitted()
    assert queue.web.hold(ALICE, [first, second], 2)
    assert not queue.web.hold(ALICE, [third], 2)
    assert queue.web.hold(BOB, [third], 2)  # another key's share is its own
    queue.web.release_hold(ALICE, [first.id])
    assert queue.web.hold(ALICE, [third], 2)
    assert not queue.web.hold(ALICE, [submitted(), submitted()], 3), "all or none"
    assert queue.redis.zcard(owner_key(queue.name, ALICE)) == 2
    gone = submitted(timeout=-1)  # its deadline has passed: a web process that died holding it leaks nothing
    queue.redis.zadd(owner_key(queue.name, ALICE), {gone.id: gone.deadline})
    assert queue.web.hold(ALICE, [submitted()], 3)
    assert 0 < queue.redis.ttl(owner_key(queue.name, ALICE)) <= 62
    assert queue.redis.zscore(owner_key(queue.name, ALICE), gone.id) is None
    assert queue.redis.zcard(owner_key(queue.name, ALICE)) == 3


def test_a_hold_replayed_after_a_lost_reply_and_refused_counts_nothing(queue):
    """The first HOLD ran but its reply was lost; the replay finds its own ids counted and refuses: the refusal
    must not leave them counted until their deadline."""
    jobs = [submitted(), submitted()]
    assert queue.web.hold(ALICE, jobs, 2)
    assert not queue.web.hold(ALICE, jobs, 2)  # what retry_once's second run answers
    assert queue.redis.zcard(owner_key(queue.name, ALICE)) == 0
